import importlib.metadata
import subprocess
import sys


def test_transformers_does_not_mistake_our_kernels_package_for_hf_kernels():
    # transformers probes an import named `kernels` (Hugging Face's hub kernels); ours must not pass.
    code = ("import kernels, transformers.utils.import_utils as iu; "
            "assert kernels.__file__ and 'selective_scan' in dir(kernels); print(iu.is_kernels_available())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_console_script_is_installed_and_helpful():
    eps = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "vlmamba"]
    assert eps and eps[0].value == "server.cli:main"
    out = subprocess.run([sys.executable, "-m", "server.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("assemble", "generate", "serve", "shapes-export"):
        assert cmd in out.stdout
