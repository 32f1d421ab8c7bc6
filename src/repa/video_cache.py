"""Alias of :mod:`repa.cache.video` (the video feature cache), kept so ``repa.video_cache`` imports work.

``import repa.video_cache`` returns the very module ``repa.cache.video``: names, monkeypatches
and ``isinstance`` checks are shared.
"""

import sys

from .cache import video as _video

sys.modules[__name__] = _video
