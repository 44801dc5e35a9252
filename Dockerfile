# streampipe: one image for every command (edge, sensors, replay, demo, broker init-secure).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streampipe ./streampipe
# [secure]: cryptography, for `broker init-secure` (docker-compose.yml's init service).
# /state is created here so that a named volume mounted on it belongs to streampipe.
RUN pip install ".[secure]" \
    && useradd --system --uid 10001 --no-create-home streampipe \
    && mkdir /state && chown streampipe /state
USER streampipe
EXPOSE 9108
ENTRYPOINT ["streampipe"]
CMD ["--help"]
