# From the repository's root this folder, installed as qpass.kernels, is also importable as a top-level
# ``kernels``: the name of a Hugging Face distribution that transformers imports (5.25 on). Imported under that
# name, hand it to the distribution where one is installed.
if __name__ == "kernels":
    import importlib.util
    import os
    import sys
    from importlib.machinery import PathFinder

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = PathFinder.find_spec(__name__, [p for p in sys.path if os.path.abspath(p or ".") != _root])
    if _spec is not None and _spec.origin is not None:  # (a regular package or module, not a namespace)
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _module  # what the import statement returns
        _spec.loader.exec_module(_module)
