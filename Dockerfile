# The workbench image: runs studies (`python -m studies.run`) and optuna-dashboard.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY studies studies
COPY search_spaces search_spaces
COPY models models
RUN pip install ".[train]"

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 workbench && mkdir -p /data && chown workbench /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Configs name their search space relative to themselves (../search_spaces/...).
COPY configs configs
COPY search_spaces search_spaces
ENV PATH=/opt/venv/bin:$PATH WORKBENCH_HOME=/data TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
USER workbench
ENTRYPOINT ["python", "-m", "studies.run"]
CMD ["configs/breast_cancer.yaml"]
