"""Pictures and voice messages read on this box: the text in a screenshot (:mod:`core.media.ocr`),
the words of a voice message (:mod:`core.media.audio` decodes it, :mod:`core.media.speech`
transcribes it), each computed off the event loop in a thread of lowest CPU priority
(:mod:`core.lowprio`), from models on disk only: nothing is downloaded at run time.
"""
