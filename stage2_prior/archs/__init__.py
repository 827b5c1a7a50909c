"""Prior archs, one file each. Every module in this folder is imported here, and each registers its archs
at its end (`stage2_prior.registry`): a new arch is a new file."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
