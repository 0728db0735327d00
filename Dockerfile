# kdpipe image: the pipeline (`kdpipe run`, i.e. `dvc repro`), and the same image serves as MLflow server,
# Prefect server and Prefect worker in compose.yaml. CPU or CUDA: the torch wheels pinned in pyproject.toml
# carry the CUDA runtime; run with `--gpus all` to use a GPU. Build and run: docs/scaling.md, "Container".
#
#   docker build -t kdpipe:latest \
#     --build-arg GIT_COMMIT="$(git rev-parse HEAD)" \
#     --build-arg GIT_DIRTY="$(test -z "$(git status --porcelain --untracked-files=no)" && echo False || echo True)" .
#
# python:3.11.14-slim-bookworm, pinned by the digest of its multi-architecture index (a tag can move).
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MPLBACKEND=Agg \
    MLFLOW_TRACKING_URI=sqlite:////app/mlartifacts/mlflow.db

# git: DVC and kdpipe's lineage use the repository of a checkout mounted at /app (compose.yaml's worker),
# whose owner may differ from the container's user (safe.directory). The base image's digest fixes the
# Debian release; its point releases drop superseded package versions, so exact apt pins would break builds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends git \
 && rm -rf /var/lib/apt/lists/* \
 && git config --system --add safe.directory /app \
 && useradd --create-home --no-log-init --uid 1000 --user-group kdpipe \
 && install -d -o kdpipe -g kdpipe /app /home/kdpipe/.prefect

WORKDIR /app

# Dependencies first, from pyproject.toml alone: this layer (torch & co., GBs) is rebuilt only when
# pyproject.toml changes, not on every edit of the code.
COPY pyproject.toml /tmp/kdpipe/pyproject.toml
RUN python -c "import tomllib; deps = tomllib.load(open('/tmp/kdpipe/pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/kdpipe/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
 && pip install --no-cache-dir -r /tmp/kdpipe/requirements.txt \
 && rm -rf /tmp/kdpipe

# The project (what .dockerignore lets through: code, dvc.yaml/dvc.lock, params, configs; no .git, no run
# products). Owned by the runtime user: a DVC workspace is written to (dvc.lock, data/, .dvc/tmp).
# Installed editable, so a checkout mounted over /app is the code that runs.
COPY --chown=kdpipe:kdpipe . .
RUN pip install --no-cache-dir --no-deps -e .

# numeric, so the runtime (and Kubernetes' runAsNonRoot) can tell it is not root: kdpipe (1000:1000)
USER 1000:1000

# No .git in the image: DVC runs without an SCM; the mount points of the volumes below exist, owned by kdpipe
# (a named volume starts as a copy of them).
RUN dvc config --local core.no_scm true \
 && mkdir -p data .dvc/cache mlartifacts

# The commit the image was built from (no fake `git init` commit): an OCI label, and the environment that
# kdpipe's lineage (kdpipe/provenance.py git_state) records as git.commit/git.dirty when there is no repository.
# Last, so a new commit does not invalidate the layers above.
ARG GIT_COMMIT=""
ARG GIT_DIRTY=""
LABEL org.opencontainers.image.title="kdpipe" \
      org.opencontainers.image.description="Data-free knowledge-distillation pipeline (DVC + MLflow + Prefect)" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
ENV KDPIPE_GIT_COMMIT="${GIT_COMMIT}" \
    KDPIPE_GIT_DIRTY="${GIT_DIRTY}"

# data/: the DVC outputs; .dvc/cache: DVC's cache and run-cache (a new container skips the unchanged stages);
# mlartifacts/: the MLflow store (mlflow.db and artifacts) while MLFLOW_TRACKING_URI is the sqlite default.
VOLUME ["/app/data", "/app/.dvc/cache", "/app/mlartifacts"]

ENTRYPOINT ["kdpipe"]
CMD ["run"]
