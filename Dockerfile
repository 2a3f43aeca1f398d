# One image runs any pacsflow service: `pacsflow <service>`, or `pacsflow run` for all of them.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip wheel --no-cache-dir --wheel-dir /wheels -r requirements.lock \
 && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 1000 pacsflow \
 && useradd --system --uid 1000 --gid pacsflow --home-dir /var/lib/pacsflow --create-home pacsflow
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels /wheels/*.whl \
 && rm -rf /wheels
COPY config/pacsflow.example.yaml /etc/pacsflow/pacsflow.example.yaml
ENV PYTHONUNBUFFERED=1 \
    PACSFLOW_SECRETS_DIR=/run/secrets
WORKDIR /var/lib/pacsflow
USER pacsflow
# 9400: /metrics, /healthz, /readyz; 11112: the router SCP.
EXPOSE 9400 11112
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9400/healthz', timeout=4)"]
ENTRYPOINT ["pacsflow"]
CMD ["run"]
