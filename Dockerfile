# Three images from one file, every dependency pinned by constraints.txt:
#   docker build --target serving -t workbench-api .        the prediction API, numpy only (dense models)
#   docker build --target serving-tf -t workbench-api-tf .  the same API with TensorFlow (CNN models)
#   docker build --target workbench -t workbench .          studies (python -m studies.run), MLflow server,
#                                                           optuna-dashboard, batch scoring
# No Docker engine: scripts/images.sh builds the same targets with podman (README "Images").
# compose.yaml builds them. Only wheels are installed: no compiler in any stage, and the final
# stages hold the virtualenv and the files they run, under a non-root user (uid 10001).
#
# Volume contract: every image keeps its state under /data (WORKBENCH_HOME): the embedded SQLite
# stores and local artifacts; a bind-mounted folder must be writable by uid 10001. The serving
# images read models from the registry MLFLOW_TRACKING_URI names, else from /data's embedded store.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# A venv with safe, pinned build tools (scripts/safe-versions.txt), then each target's dependencies
# from pyproject.toml alone (empty packages stand in for the code): a code change rebuilds only the
# last layer of each target, and the serving venv never sees a training package.
FROM ${PYTHON_IMAGE} AS venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY constraints.txt pyproject.toml ./
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --only-binary=:all: -c constraints.txt --upgrade pip setuptools wheel \
 && mkdir studies search_spaces models serving \
 && touch README.md studies/__init__.py search_spaces/__init__.py models/__init__.py serving/__init__.py

FROM venv AS deps-serving
RUN /opt/venv/bin/pip install --only-binary=:all: -c constraints.txt ".[serve]"

FROM deps-serving AS deps-serving-tf
RUN /opt/venv/bin/pip install --only-binary=:all: -c constraints.txt ".[serve,tf]"

FROM deps-serving-tf AS deps-workbench
RUN /opt/venv/bin/pip install --only-binary=:all: -c constraints.txt ".[train,serve,batch]"

FROM ${PYTHON_IMAGE} AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY studies studies
COPY search_spaces search_spaces
COPY models models
COPY serving serving

# The project's own code over the stand-ins, in each target's venv (no dependency changes), from a
# clean folder (the stand-ins' build/ would shadow it).
# The serving venvs keep no installer: nothing is installed into them at run time.
FROM deps-serving AS build-serving
COPY --from=source /src /code
RUN /opt/venv/bin/pip install --only-binary=:all: -c constraints.txt --no-deps --force-reinstall /code \
 && /opt/venv/bin/python -m pip uninstall --yes --quiet pip setuptools wheel

FROM deps-serving-tf AS build-serving-tf
COPY --from=source /src /code
RUN /opt/venv/bin/pip install --only-binary=:all: -c constraints.txt --no-deps --force-reinstall /code \
 && /opt/venv/bin/python -m pip uninstall --yes --quiet pip setuptools wheel

FROM deps-workbench AS build-workbench
COPY --from=source /src /code
RUN /opt/venv/bin/pip install --only-binary=:all: -c constraints.txt --no-deps --force-reinstall /code

# The final stages' base: the user, /data, and no build tools outside the venv (the base image's
# own pip/setuptools and Debian's bundled wheels for ensurepip are older than the safe floors).
FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --create-home --uid 10001 workbench && mkdir -p /data && chown workbench /data \
 && (python -m pip uninstall --yes --quiet pip setuptools wheel 2>/dev/null || true) \
 && rm -rf /usr/share/python-wheels
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH WORKBENCH_HOME=/data TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1

FROM runtime AS serving-base
ENV SERVING_HOST=0.0.0.0 SERVING_PORT=8000
USER workbench
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('SERVING_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["python", "-m", "serving"]

FROM serving-base AS serving
COPY --from=build-serving /opt/venv /opt/venv

# The same API with TensorFlow: for the models whose network numpy cannot run (the numpy image
# names this target when it is handed one).
FROM serving-base AS serving-tf
COPY --from=build-serving-tf /opt/venv /opt/venv

FROM runtime AS workbench
COPY --from=build-workbench /opt/venv /opt/venv
# Configs name their search space relative to themselves (../search_spaces/mlp.yaml): the YAML
# files only (the code is installed in the venv).
COPY configs configs
COPY search_spaces/*.yaml search_spaces/
# compose's dask profile runs `dask scheduler` / `dask worker` from this image: the batch parts' settings.
COPY serving/batch/dask.yaml /etc/dask/workbench.yaml
USER workbench
EXPOSE 5000 8080
ENTRYPOINT ["python", "-m", "studies.run"]
CMD ["configs/breast_cancer.yaml"]
