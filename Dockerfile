# kdpipe: installs the package and runs the pipeline with `dvc repro` (CPU or CUDA: the torch wheels
# pinned in pyproject.toml carry the CUDA runtime; run with `--gpus all` to use a GPU).
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MPLBACKEND=Agg

RUN apt-get update && apt-get install -y --no-install-recommends git make && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY kdpipe ./kdpipe
COPY flows ./flows
RUN pip install .

COPY . .
# dvc needs a git repository; a build context without .git gets a fresh one
RUN (git rev-parse --git-dir >/dev/null 2>&1 || (git init -q && git add -A && \
     git -c user.email=docker@kdpipe -c user.name=docker commit -qm "image")) && \
    (test -d .dvc || dvc init -q)

CMD ["dvc", "repro"]
