# API:    docker run -p 8000:8000 -e CASCADE_DATABASE_URL=… -e CASCADE_REDIS_URL=… cascade
# Worker: docker run -e CASCADE_DATABASE_URL=… -e CASCADE_REDIS_URL=… cascade cascade worker
# Migrations: docker run -e CASCADE_DATABASE_URL=… cascade cascade migrate
# All three also need CASCADE_API_KEY_PEPPER, CASCADE_UNSUBSCRIBE_SECRET and CASCADE_RECEIPT_KEYS;
# see compose.yaml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv/cascade

COPY pyproject.toml README.md ./
COPY app ./app
COPY providers ./providers
COPY openapi ./openapi
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /srv/cascade cascade \
    && chown -R cascade /srv/cascade

USER cascade
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["cascade", "api", "--host", "0.0.0.0", "--port", "8000"]
