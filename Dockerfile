# Two images from one file, every dependency pinned by constraints.txt:
#   docker build --target workbench -t workbench .    studies (python -m studies.run), MLflow server, optuna-dashboard
#   docker build --target serving -t workbench-api .   the prediction API (python -m serving)
# compose.yaml builds both. Only wheels are installed: no compiler in any stage, and the final
# stages hold the virtualenv and the files they run, under a non-root user.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY studies studies
COPY search_spaces search_spaces
COPY models models
COPY serving serving
RUN python -m venv /opt/serve \
 && /opt/serve/bin/pip install --only-binary=:all: -c constraints.txt ".[serve]" \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --only-binary=:all: -c constraints.txt ".[train,serve,batch]"

FROM ${PYTHON_IMAGE} AS serving
RUN useradd --create-home --uid 10001 workbench
COPY --from=build /opt/serve /opt/serve
WORKDIR /app
ENV PATH=/opt/serve/bin:$PATH TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1 SERVING_HOST=0.0.0.0 SERVING_PORT=8000
USER workbench
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2)"]
ENTRYPOINT ["python", "-m", "serving"]

FROM ${PYTHON_IMAGE} AS workbench
RUN useradd --create-home --uid 10001 workbench && mkdir -p /data && chown workbench /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Configs name their search space relative to themselves (../search_spaces/mlp.yaml): the YAML
# files only (the code is installed in the venv).
COPY configs configs
COPY search_spaces/*.yaml search_spaces/
ENV PATH=/opt/venv/bin:$PATH WORKBENCH_HOME=/data TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
USER workbench
EXPOSE 5000 8080
ENTRYPOINT ["python", "-m", "studies.run"]
CMD ["configs/breast_cancer.yaml"]
