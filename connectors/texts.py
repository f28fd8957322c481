"""What the platform connectors say to a chat user themselves, in Chinese and English.

"Busy" and "failed" must never read alike: busy means "nothing went wrong, come back in a
few seconds", failed means "an error on botd's side; trying again the same way may not help".
"""

from __future__ import annotations

BUSY = "我现在有点忙，请 {s} 秒后再发一次。\nI am busy right now; please send it again in {s} s."
FAILED = ("抱歉，这次回答时我这边出错了（已记入日志）。可以换个说法再问，或告诉管理员。\n"
          "Sorry, answering failed because of an error on my side (it is logged). "
          "Try rephrasing, or tell your admin.")
CUT = "（回答未完成 / the answer was cut off）"
