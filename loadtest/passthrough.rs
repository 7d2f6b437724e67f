//! wardgate's HTTP stack with no enforcement, for the load test (issue 7): the same listener
//! (`wardgate::server::serve`), the same upstream client and pool (`wardgate::proxy`), the same
//! runtime and allocator as `wardgate serve`, passing every upstream page back as it came: no
//! token, no policy, no filter, no audit. It measures what the stack itself costs, so that the
//! load test can tell how much of wardgate's distance from nginx is enforcement and how much
//! is the HTTP stack any Rust proxy built on hyper would carry. Never a way to serve data.
//!
//! `cargo run --release --example passthrough -- --listen 127.0.0.1:8081 --upstream http://127.0.0.1:8080`

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use wardgate::config::{Dialect, UpstreamConfig};
use wardgate::proxy::Upstreams;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Where to listen (plain HTTP, loopback in the load test).
    #[arg(long)]
    listen: SocketAddr,
    /// The upstream's base URL.
    #[arg(long)]
    upstream: http::Uri,
    /// Idle upstream connections kept (as `datasets.NAME.idle_connections`).
    #[arg(long, default_value_t = 1024)]
    idle_connections: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let cfg = BTreeMap::from([(
        "store".to_owned(),
        UpstreamConfig {
            base: args.upstream,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(30),
            idle_connections: args.idle_connections,
            authorization: None,
            tls: None,
            dialect: Dialect::Wardgate,
        },
    )]);
    let upstreams = Arc::new(Upstreams::new(&cfg, 64 << 20)?);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    anyhow::ensure!(upstreams.get("store").is_some(), "no upstream configured");
    let handler = move |req: Request<Incoming>, _peer: SocketAddr| {
        let upstreams = Arc::clone(&upstreams);
        async move {
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let answer = match upstreams.get("store") {
                Some(up) => up.send(Method::GET, path, None, "passthrough").await.ok(),
                None => None,
            };
            let (status, body) = match answer.map(|r| (r.status, r.body)) {
                Some((status, Ok(body))) => (status, body),
                _ => (StatusCode::BAD_GATEWAY, Bytes::new()),
            };
            let mut resp = Response::new(Full::new(body));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
    };
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    wardgate::server::serve(
        listener,
        None,
        handler,
        shutdown,
        wardgate::server::Limits {
            plane: "data",
            max_connections: wardgate::config::DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: Duration::from_secs(30),
            grace: Duration::from_secs(1),
            write_stall_timeout: Duration::from_secs(300),
            run_to_end: false,
        },
    )
    .await
}
