# The local stand-in for prom/prometheus where the registry cannot be pulled: Debian's prometheus on the local base
# (`make images` builds it). Entry point, working directory and user as in the official image, so the compose
# file's `command:` (flags only) and its /prometheus volume work unchanged.
ARG BASE_IMAGE=localhost/dare-python:3.11-bookworm
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && mkdir -p /prometheus && chown nobody:nogroup /prometheus
WORKDIR /prometheus
# hadolint ignore=DL3066
USER nobody
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
