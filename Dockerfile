# One image for every service in docker-compose.yml: the CLI (migrate, api) and
# the Celery worker, beat and flower processes.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PROGRESS_RESET_DATA_DIR=/app/data

WORKDIR /app

# The runtime dependencies only, at the versions of the lock file.
COPY pyproject.toml requirements.lock README.md ./
COPY models ./models
COPY tasks ./tasks
COPY workers ./workers
COPY producer ./producer
RUN pip install --no-cache-dir -c requirements.lock . \
    && useradd --create-home --uid 10001 app \
    && mkdir -p /app/data \
    && chown app:app /app/data

USER app
CMD ["progress-reset", "--help"]
