"""What botd's admin commands (``model``, ``doctor``, ``init``) say on the terminal, in Chinese and English.

Each text is a pair (Chinese, English); :func:`say` picks one by the admin's locale:
``BOTD_LANG`` ("zh" or "en") if set, else ``LC_ALL`` / ``LC_MESSAGES`` / ``LANG`` -- a locale
starting with "zh" gives Chinese, anything else English. Fields go in {braces}.
"""

from __future__ import annotations

import os
from typing import Literal

_TEXTS: dict[str, tuple[str, str]] = {
    # model list / pull
    "LIST_HEAD": ("可下载的模型（目录版本 {version}）。本机内存 {ram}，{cores} 核；"
                  "内存按 n_ctx={n_ctx}、parallel={parallel} 估算：",
                  "Models in the catalogue (version {version}). This box: {ram} RAM, {cores} cores; "
                  "RAM needed at n_ctx={n_ctx}, parallel={parallel}:"),
    "LIST_FOOT": ("✓ 已下载　✗ 内存不够　? 校验和未确认（需 --sha256 或 --trust-unverified）。"
                  "下载：botd model pull 名称",
                  "✓ downloaded   ✗ does not fit this box's RAM   ? checksum not confirmed (needs --sha256 or "
                  "--trust-unverified). Download: botd model pull NAME"),
    "UNKNOWN_MODEL": ("目录中没有模型 {name!r}；可用：{known}",
                      "no model named {name!r} in the catalogue; known: {known}"),
    "UNCONFIRMED": ("{name} 的校验和未确认（{evidence}）。请从发布者页面读取 SHA-256 后用 --sha256 HEX 传入，"
                    "或用 --trust-unverified 下载（下载后会打印并保存文件的 SHA-256，请自行核对）。",
                    "the checksum of {name} is not confirmed ({evidence}). Read the SHA-256 on the publisher's page "
                    "and pass it with --sha256 HEX, or pass --trust-unverified to download anyway (the file's "
                    "SHA-256 is then printed and saved beside it for you to compare)."),
    "SHA_ONE_FILE": ("--sha256 只能用于单个文件的模型；{name} 有 {n} 个文件",
                     "--sha256 applies to a model of one file; {name} has {n} files"),
    "BAD_SHA_ARG": ("--sha256 须是 64 位十六进制数", "--sha256 must be 64 hexadecimal digits"),
    "NO_SOURCE": ("{file}：没有可用的下载源（ModelScope、Hugging Face、镜像都失败）：{errors}",
                  "{file}: no source could serve it (ModelScope, Hugging Face, mirror): {errors}"),
    "DISK_FULL": ("{dir} 所在磁盘已满：还需要 {need}，只剩 {free}。已下载的 {done} 保留在 {part}，"
                  "腾出空间后再次运行同一命令即可续传。",
                  "the disk holding {dir} is full: {need} more are needed, {free} are free. The {done} downloaded "
                  "so far stay in {part}; free some space and run the same command again to resume."),
    "DISK_SHORT": ("{dir} 所在磁盘空间不足：下载需要 {need}，只剩 {free}。未开始下载。",
                   "not enough space on the disk holding {dir}: the download needs {need}, {free} are free. "
                   "Nothing was downloaded."),
    "MISMATCH": ("{file} 校验失败：应为 SHA-256 {want}，实际为 {got}。文件未被使用，已移到 {bad}；"
                 "再次运行会重新下载。若反复出现，请换一个下载源（--source）。",
                 "{file} failed its check: SHA-256 should be {want}, it is {got}. The file was not used; it was "
                 "moved to {bad} and the next run downloads it again. If this repeats, try another --source."),
    "SIZE_MISMATCH": ("{file} 大小不符：应为 {want} 字节，下载源给出 {got} 字节。文件未被使用。",
                      "{file} has the wrong size: {want} bytes expected, the source sent {got}. "
                      "The file was not used."),
    "INTERRUPTED": ("{file} 下载中断（{error}）；已下载的 {done} 保留在 {part}，再次运行同一命令即可续传。",
                    "{file}: the download was interrupted ({error}); the {done} downloaded so far stay in {part}; "
                    "run the same command again to resume."),
    "EXISTS_OTHER": ("{path} 已存在且内容不同（SHA-256 不符）；请先移走它。",
                     "{path} already exists with other contents (its SHA-256 differs); move it away first."),
    "CANCELLED": ("已取消；已下载的部分会保留，再次运行同一命令即可续传。",
                  "cancelled; what was downloaded is kept, and the same command resumes it."),
    "LOCKED": ("另一个 botd model pull 正在下载 {name}；等它结束。",
               "another botd model pull is fetching {name}; wait for it to end."),
    "BAD_URL": ("{url}：网址须以 .gguf 文件名结尾", "{url}: the URL must end in a .gguf file name"),
    "ALREADY_UNVERIFIED": ("{path} 已存在（没有可核对的校验和，未校验）。",
                           "{path} is already there (no checksum to check it against: not verified)."),
    "ALREADY": ("{path} 已下载并校验过。", "{path} is already downloaded and verified."),
    "FETCHING": ("下载 {file}（{size}）自 {url}", "fetching {file} ({size}) from {url}"),
    "RESUMING": ("从 {done} 处续传 {file}", "resuming {file} from {done}"),
    "DONE": ("已下载并校验：{path}", "downloaded and verified: {path}"),
    "UNVERIFIED_DONE": ("已下载但未校验：{path}\n  SHA-256 {sha}（已写入 {side}）——请与发布者页面核对。",
                        "downloaded WITHOUT a known checksum: {path}\n  SHA-256 {sha} (written to {side}): "
                        "compare it with the publisher's page."),
    "PROGRESS": ("{file}：{pct}%（{done} / {total}）", "{file}: {pct}% ({done} of {total})"),
    "SET_DEFAULT": ("已写入 {config}：[{section}] path = {path}。运行中的 botd 需要重新加载：systemctl reload botd"
                    "（或 kill -HUP 进程号）；当前回答结束后换用新模型。",
                    "wrote [{section}] path = {path} into {config}. A running botd takes it on a reload: "
                    "systemctl reload botd (or kill -HUP its pid); the new model loads once the running answers end."),
    "SET_DEFAULT_ENGINE": ("注意：[model] engine = {engine!r}，只有 llama_cpp 引擎使用 path；已一并改为 llama_cpp。",
                           "note: [model] engine was {engine!r}; only llama_cpp reads path, "
                           "so it was set to llama_cpp."),
    "CONFIG_UNREADABLE": ("无法修改 {config}：{error}", "cannot edit {config}: {error}"),
    "CONFIG_REJECTED": ("修改后的配置未通过检查，{config} 保持原样：{error}",
                        "the edited config does not pass check-config; {config} is left as it was: {error}"),
    "NEXT_USE": ("使用它：botd model pull {name} --set-default，或在 config.toml 的 [model] 中设 path = \"{path}\"",
                 "to use it: botd model pull {name} --set-default, "
                 "or set path = \"{path}\" under [model] in config.toml"),
    # model pull, embedding models
    "UNCONFIRMED_FOLDER": ("{name} 的文件没有全部给出已确认的大小和 SHA-256；嵌入模型只下载全部可校验的条目。",
                           "not every file of {name} has a confirmed size and SHA-256; an embedding model is "
                           "only downloaded when every file can be checked."),
    "EMBED_FLAGS": ("--sha256、--trust-unverified 和 --as 只用于聊天模型（GGUF 文件）；嵌入模型的每个文件都按目录中的"
                    "校验和检查。",
                    "--sha256, --trust-unverified and --as apply to chat models (GGUF files); each file of an "
                    "embedding model is checked against the catalogue's checksums."),
    "EMBED_EXTRA_MISSING": ("注意：使用这个模型需要 sentence-transformers，本机尚未安装。安装：{python} -m pip install "
                            "'botd[sentence-transformers]'（会安装 torch，约 1 GB 以上）。",
                            "note: this model needs sentence-transformers, which is not installed here. Install "
                            "it with: {python} -m pip install 'botd[sentence-transformers]' (it brings torch, "
                            "1 GB or more)."),
    "EMBED_NOT_SET": ("未修改 {config}：没有 botd[sentence-transformers]，botd 无法加载这个嵌入模型。安装后再运行同一"
                      "命令（已下载的文件不会重新下载）。",
                      "{config} was not changed: without botd[sentence-transformers] botd cannot load this "
                      "embedding model. Install it, then run the same command again (nothing is downloaded twice)."),
    "NEXT_USE_EMBEDDINGS": ("使用它：botd model pull {name} --set-default，或在 config.toml 的 [embeddings] 中设 "
                            "model = \"{path}\"",
                            "to use it: botd model pull {name} --set-default, "
                            "or set model = \"{path}\" under [embeddings] in config.toml"),
    "SET_DEFAULT_EMBEDDINGS": ("已写入 {config}：[embeddings] model = {path}。运行中的 botd 在重新加载时换用它："
                               "systemctl reload botd（或 kill -HUP 进程号）。知识库要用新模型重建索引："
                               "botd kb ingest；重建之前只按词语检索。",
                               "wrote [embeddings] model = {path} into {config}. A running botd takes it on a "
                               "reload: systemctl reload botd (or kill -HUP its pid). Rebuild the knowledge "
                               "indexes with the new model: botd kb ingest; until then they are searched by "
                               "words only."),
    "LIST_EMBED_HEAD": ("嵌入模型（[embeddings] model；需要 botd[sentence-transformers]）：",
                        "Embedding models ([embeddings] model; need botd[sentence-transformers]):"),
    # doctor
    "DOCTOR_HEAD": ("botd doctor：检查 {config}", "botd doctor: checking {config}"),
    "DOCTOR_OK": ("全部通过。", "all checks passed."),
    "DOCTOR_FAILED": ("{n} 项未通过（见 ✗ 行的修复建议）。", "{n} check(s) failed (see the fix under each ✗)."),
}

Lang = Literal["zh", "en"]


def lang() -> Lang:
    """The admin's language: BOTD_LANG, else the locale (zh* -> Chinese), else English."""
    choice = os.environ.get("BOTD_LANG", "").strip().lower()
    if choice in ("zh", "en"):
        return "zh" if choice == "zh" else "en"
    for var in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(var, "")
        if value:
            return "zh" if value.lower().startswith("zh") else "en"
    return "en"


def say(key: str, **fields: object) -> str:
    """The text ``key`` in the admin's language, its fields filled in."""
    zh, en = _TEXTS[key]
    return (zh if lang() == "zh" else en).format(**fields)


def both(key: str, **fields: object) -> tuple[str, str]:
    """Both forms (Chinese, English) of ``key``: for machine output (doctor --json)."""
    zh, en = _TEXTS[key]
    return zh.format(**fields), en.format(**fields)


def size_text(n: int) -> str:
    """Bytes for a person: 491.4 MB, 2.10 GB."""
    if n >= 10**9:
        return f"{n / 10**9:.2f} GB"
    if n >= 10**6:
        return f"{n / 10**6:.1f} MB"
    if n >= 10**3:
        return f"{n / 10**3:.1f} kB"
    return f"{n} B"
