# The local stand-in for redis:7.2-alpine where the registry cannot be pulled: Debian's redis-server on the local
# base (`make images` builds it). /data and the redis user as in the official image.
ARG BASE_IMAGE=localhost/dare-python:3.11-bookworm
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server redis-tools \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && mkdir -p /data && chown redis:redis /data
WORKDIR /data
# hadolint ignore=DL3066
USER redis
EXPOSE 6379
CMD ["redis-server"]
