# deepinfer-router image: slim Python, non-root, the router as entrypoint.
#   docker build -t deepinfer-router .
#   docker run -p 8080:8080 deepinfer-router --engine http://engine:8000
#
# Engine hosts: start from vLLM's image and add deepinfer for the engine manager, e.g.
#   FROM vllm/vllm-openai:latest
#   COPY . /src
#   RUN pip install --no-cache-dir /src
#   ENTRYPOINT ["deepinfer-engine", "launch"]
# (run it with --gpus all and --registry redis://... or http://router:8080).
# Python 3.11: the version CI tests (.ci/run); keep the two the same.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deepinfer_router ./deepinfer_router
COPY engines ./engines
COPY configs ./configs
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --no-create-home deepinfer \
    && mkdir -p /var/lib/deepinfer && chown 10001 /var/lib/deepinfer
# /var/lib/deepinfer: the agent's state directory (compose.yaml mounts a volume there, so
# a restarted agent finds the engines it started).
USER 10001
EXPOSE 8080
ENV PYTHONUNBUFFERED=1
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2).status == 200 else 1)"
ENTRYPOINT ["deepinfer-router"]
CMD ["--host", "0.0.0.0", "--port", "8080"]
