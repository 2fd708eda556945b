# GPU image: NGC PyTorch brings CUDA, NCCL, Transformer Engine and apex (apex is not on PyPI).
# Not built in this repository's CI: our machines have no Docker engine and no GPU.
ARG NGC_TAG=25.09
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}-py3

# bubblewrap: the code reward's file-system isolation (README "Code sandbox").
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/r1mega
COPY pyproject.toml README.md ./
COPY r1mega ./r1mega
COPY conf ./conf
COPY tools ./tools
COPY slurm ./slurm
# Keep the container's torch (built for its CUDA): pip must not replace it.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/constraints.txt \
 && pip install --no-cache-dir -c /tmp/constraints.txt -e ".[gpu,slurm]"
ENV TORCHDYNAMO_DISABLE=0 CUDA_DEVICE_MAX_CONNECTIONS=1
ENTRYPOINT ["python", "-m", "r1mega"]
