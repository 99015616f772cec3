//! A trivial upstream for the load script (`tests/load/run.sh`): answers every request with a
//! small JSON body over keep-alive, and `POST /settle` like an x402 facilitator that always
//! succeeds (the load test measures tollgate, not a chain).
//!
//! `cargo run --release --example load_upstream -- 127.0.0.1:18080`

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;

const OK: &[u8] = br#"{"ok":true}"#;
const SETTLED: &[u8] = br#"{"success":true,"transaction":"0x0000000000000000000000000000000000000000000000000000000000000001","network":"eip155:84532"}"#;

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = if req.uri().path() == "/settle" {
        SETTLED
    } else {
        OK
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body)));
    response.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18080".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}
