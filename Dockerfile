# vlmamba-serve: the OpenAI-compatible VL-Mamba server in a container (docs/deploy.md).
#
#   docker build -t vlmamba-serve .                                         # CUDA image (default target)
#   docker build --build-arg TORCH_CUDA_ARCH_LIST="8.0;9.0" -t vlmamba-serve .  # A100 + H100
#   docker build --target cpu -t vlmamba-serve:cpu .                        # small CPU-only image
#   docker run --gpus 1 -p 8000:8000 vlmamba-serve                          # the bundled demo model
#   docker run --gpus 1 -p 8000:8000 -v /srv/models:/models:ro \
#       -e VLMAMBA_CHECKPOINT=/models/my-checkpoint vlmamba-serve           # your checkpoint
#
# Every server setting is a VLMAMBA_* variable (docs/api.md, "Settings").
# Building needs network access to the registry of BASE_IMAGE and to PyPI. No "# syntax=" line on
# purpose: only the builder's built-in Dockerfile frontend is used, so a build with a local or
# mirrored base image needs nothing else from Docker Hub.

# A PyTorch image with nvcc (a "devel" image): mamba-ssm and causal-conv1d are compiled against
# its torch. Any tag works that has torch >= 2.9, Python >= 3.11 and nvcc of the same CUDA major
# version as torch; the builder stage checks this first, to fail in seconds rather than after a
# long compile. (torch >= 2.9 because mamba-ssm >= 2.3, below, needs triton >= 3.5.)
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-devel
# What the server runs on. The compiled kernels link against BASE_IMAGE's torch, so this must
# carry the very same torch build: by default BASE_IMAGE itself; the "-runtime" variant of the
# same tag is several GB smaller (gcc is added to it below, for Triton).
ARG RUNTIME_IMAGE=${BASE_IMAGE}
# Base of the CPU-only target (any image with Python >= 3.11 and pip).
ARG CPU_BASE_IMAGE=python:3.11-slim-bookworm


# ---------------------------------------------------------------------------------------------
# cpu: a CPU-only image (docker-compose.cpu.yml), without CUDA, nvcc or the CUDA kernels.
# First in the file so that the legacy builder (DOCKER_BUILDKIT=0), which builds every stage up
# to the target, can build it without the CUDA base image; BuildKit (the default since Docker 23)
# builds only the stages a target needs.
FROM ${CPU_BASE_IMAGE} AS cpu

# The CPU wheel index: PyPI's Linux torch wheels bundle several GB of CUDA libraries.
ARG TORCH_SPEC="torch>=2.6"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

COPY pyproject.toml README.md /src/
COPY kernels /src/kernels
COPY model /src/model
COPY server /src/server
# The constraint keeps the torch just installed: nothing below may swap it for PyPI's CUDA build.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch.txt \
 && PIP_CONSTRAINT=/tmp/torch.txt pip install /src \
 && rm -rf /src /tmp/torch.txt \
 && python -c "import server.app, model.demo; assert model.demo.DEMO_CHECKPOINT.is_dir()"

COPY deploy/docker/healthcheck.py /opt/vlmamba/healthcheck.py
# A fixed non-root uid, so that mounted checkpoint directories can be made readable to it.
RUN useradd --create-home --uid 10001 --user-group vlmamba
USER vlmamba
WORKDIR /home/vlmamba
# HF_HUB_OFFLINE: the server only loads local checkpoints; never wait on the Hub at start-up.
ENV VLMAMBA_PORT=8000 VLMAMBA_DEVICE=cpu PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
EXPOSE 8000
# start-period: loading a checkpoint; /health answers 503 until the engine runs.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/vlmamba/healthcheck.py"]
# Exec form: the server is PID 1 and gets SIGTERM itself, and drains for VLMAMBA_GRACE_PERIOD.
ENTRYPOINT ["vlmamba"]
CMD ["serve", "--host", "0.0.0.0"]


# ---------------------------------------------------------------------------------------------
# builder: wheels of the project and of the CUDA kernels, compiled for TORCH_CUDA_ARCH_LIST.
FROM ${BASE_IMAGE} AS builder

# Compute capabilities to compile for: "9.0" = H100/H200; "8.0" A100, "8.6" A10/RTX 30xx,
# "8.9" L4/L40/RTX 40xx, "10.0" B200 (needs CUDA >= 12.8); several: "8.0;9.0".
ARG TORCH_CUDA_ARCH_LIST="9.0"
# Parallel compile jobs: each nvcc job can take several GB of memory.
ARG MAX_JOBS=8
# mamba-ssm >= 2.3: 2.2.x imports names that transformers 5 removed (GreedySearchDecoderOnlyOutput),
# so with this project's transformers its kernels would never load.
ARG MAMBA_SSM_SPEC="mamba-ssm>=2.3"
ARG CAUSAL_CONV1D_SPEC="causal-conv1d>=1.4"
# *_FORCE_BUILD: compile here instead of downloading the projects' prebuilt wheels from GitHub,
# which exist for only a few torch/CUDA pairs and target every architecture.
ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=${MAX_JOBS} \
    MAMBA_FORCE_BUILD=TRUE \
    CAUSAL_CONV1D_FORCE_BUILD=TRUE \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# (mamba-ssm's setup.py finds nvcc through CUDA_HOME, as torch does, and quietly drops
# TORCH_CUDA_ARCH_LIST when nvcc's CUDA major version differs from torch's.)
RUN python -c "import re, subprocess, sys, torch; from torch.utils.cpp_extension import CUDA_HOME; \
v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); \
assert sys.version_info >= (3, 11), f'BASE_IMAGE has Python {sys.version.split()[0]}; vlmamba-serve needs >= 3.11'; \
assert v >= (2, 9), f'BASE_IMAGE has torch {torch.__version__}; mamba-ssm 2.3 needs >= 2.9'; \
assert torch.version.cuda, 'BASE_IMAGE has a CPU-only torch; pick a CUDA PyTorch image'; \
assert CUDA_HOME, 'BASE_IMAGE has no nvcc; pick a devel image'; \
out = subprocess.run([CUDA_HOME + '/bin/nvcc', '--version'], capture_output=True, text=True).stdout; \
nvcc = re.search(r'release (\d+)', out).group(1); print('torch', torch.__version__, 'nvcc', out.split()[-1]); \
assert nvcc == torch.version.cuda.split('.')[0], f'nvcc is CUDA {nvcc}, torch was built for {torch.version.cuda}'"

# --no-build-isolation: compile against the torch already installed, not a fresh one from PyPI.
RUN pip install ninja packaging wheel "setuptools>=68"
COPY deploy/docker/cuda_arch_shim /opt/cuda_arch_shim
RUN PYTHONPATH=/opt/cuda_arch_shim pip wheel --no-build-isolation --no-deps -w /wheels \
        "${CAUSAL_CONV1D_SPEC}" "${MAMBA_SSM_SPEC}"

# The project itself: pure Python plus the bundled demo checkpoint (package data).
COPY pyproject.toml README.md /src/
COPY kernels /src/kernels
COPY model /src/model
COPY server /src/server
RUN pip wheel --no-deps -w /wheels /src


# ---------------------------------------------------------------------------------------------
# runtime (default target): the CUDA server.
FROM ${RUNTIME_IMAGE} AS runtime

# Triton (mamba-ssm's fused kernels) compiles a small launcher with the system C compiler the
# first time a kernel runs; "-runtime" PyTorch images have none.
RUN if ! command -v gcc >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=builder /wheels /tmp/wheels
# Our wheels, dependencies from PyPI; the constraint keeps the image's CUDA torch, which the
# kernels were compiled against. The import check loads the kernels as the server does (no GPU
# needed): a mamba-ssm that cannot be imported would otherwise only show as a silent fallback to
# the slow reference kernels.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch.txt \
 && PIP_CONSTRAINT=/tmp/torch.txt pip install /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels /tmp/torch.txt \
 && python -c "import torch, server.app, model.demo, selective_scan_cuda, causal_conv1d_cuda; \
import causal_conv1d, mamba_ssm.ops.selective_scan_interface, mamba_ssm.ops.triton.selective_state_update; \
assert model.demo.DEMO_CHECKPOINT.is_dir()"

COPY deploy/docker/healthcheck.py /opt/vlmamba/healthcheck.py
RUN useradd --create-home --uid 10001 --user-group vlmamba
USER vlmamba
WORKDIR /home/vlmamba
ENV VLMAMBA_PORT=8000 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
EXPOSE 8000
# A large checkpoint takes a while to load onto the GPU: a generous start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "/opt/vlmamba/healthcheck.py"]
ENTRYPOINT ["vlmamba"]
CMD ["serve", "--host", "0.0.0.0"]
