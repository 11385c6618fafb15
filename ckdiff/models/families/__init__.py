"""The model families, one module each, declared on the machinery of ``models/family.py``.

Importing this package declares every built-in family, in the order ``FAMILIES`` lists them: llama (with
mistral and codellama), gemma, mixtral, falcon, qwen (Qwen2, Qwen3, Qwen3-MoE), deepseek (DeepSeek-V3),
gpt_oss. The declaration machinery (``Family``, ``Block``, ``register``, the lookups) is re-exported here,
so ``families.get("llama")`` and ``families.register(Family(...))`` read as one namespace.
"""
from __future__ import annotations

from ckdiff.models.family import *  # noqa: F401,F403
from ckdiff.models.family import _BY_MODEL_TYPE  # noqa: F401
from ckdiff.models.families.common import LLAMA_NAMES  # noqa: F401
from ckdiff.models.families.llama import LLAMA  # noqa: F401
from ckdiff.models.families.gemma import GEMMA, GEMMA_JETSTREAM_NAMES  # noqa: F401
from ckdiff.models.families.mixtral import MIXTRAL  # noqa: F401
from ckdiff.models.families.falcon import FALCON, FALCON_NAMES  # noqa: F401
from ckdiff.models.families.qwen import QWEN2, QWEN3, QWEN3_MOE  # noqa: F401
from ckdiff.models.families.deepseek import DEEPSEEK_V3, MTP_NAMES  # noqa: F401
from ckdiff.models.families.gpt_oss import GPT_OSS  # noqa: F401
