# streampipe: one image for every command (edge, sensors, replay, demo).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streampipe ./streampipe
RUN pip install --no-cache-dir . && useradd --system --uid 10001 streampipe
USER streampipe
ENTRYPOINT ["streampipe"]
CMD ["--help"]
