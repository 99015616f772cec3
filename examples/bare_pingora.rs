//! The floor for the load test: a Pingora 0.9 reverse proxy that does nothing but forward, with
//! tollgate's server settings and allocator. `tests/load/run.sh` runs it beside nginx and
//! tollgate so the report shows how much of tollgate's cost is Pingora's and how much is
//! tollgate's own.
//!
//! Usage: `bare_pingora LISTEN UPSTREAM` (both `host:port`).

/// The allocator tollgate's binary uses (src/main.rs), so the floor is measured like for like.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Forward(HttpPeer);

#[async_trait]
impl ProxyHttp for Forward {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.0.clone()))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: bare_pingora LISTEN UPSTREAM");
        std::process::exit(2);
    };
    let conf = ServerConf {
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        upstream_keepalive_pool_size: 256,
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let conf = server.configuration.clone();
    let mut proxy = pingora::proxy::http_proxy_service(
        &conf,
        Forward(HttpPeer::new(upstream.as_str(), false, String::new())),
    );
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever();
}
