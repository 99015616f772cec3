# tollgate: multi-stage build → a small runtime image that runs as a non-root user.
#   docker build -t tollgate .
#   docker run -p 8402:8402 -p 9402:9402 -v tollgate-data:/var/lib/tollgate tollgate
# The image serves /etc/tollgate/policies (mount a ConfigMap there) with its store in
# /var/lib/tollgate/data (mount a volume on /var/lib/tollgate); see examples/kubernetes/.

FROM rust:1.95-bookworm AS build
# Pingora's zlib-ng build runs cmake.
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY grammar grammar
COPY tests tests
COPY examples examples
RUN cargo build --release --locked --bin tollgate && strip target/release/tollgate

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10402 --home-dir /var/lib/tollgate --shell /usr/sbin/nologin tollgate \
    && mkdir -p /etc/tollgate/policies /var/lib/tollgate \
    && chown tollgate /var/lib/tollgate
COPY --from=build /src/target/release/tollgate /usr/local/bin/tollgate
COPY policies/weather.toll /etc/tollgate/policies/weather.toll
# The image's default config; mount your own (or pass --config) to change it. Settings are
# not baked in as TOLLGATE_* variables, which would silently override a mounted file.
RUN printf 'policies: [/etc/tollgate/policies]\nstore: /var/lib/tollgate/data\nlog:\n  format: json\n' > /etc/tollgate/tollgate.yaml
USER 10402
WORKDIR /var/lib/tollgate
EXPOSE 8402 9402
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["run", "--config", "/etc/tollgate/tollgate.yaml"]
