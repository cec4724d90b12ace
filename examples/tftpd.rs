//! A TFTP server on a given address and root, for trying clients by hand:
//! `cargo run --example tftpd -- 127.0.0.1:6969 /srv/tftp`.
use std::sync::Arc;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:6969".into());
    let root = args.next().unwrap_or_else(|| ".".into());
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let socket = tokio::net::UdpSocket::bind(&addr).await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            s.cancel();
        });
        let stats = Arc::new(fleetwave::services::tftp::Stats::default());
        fleetwave::services::tftp::run(
            socket,
            fleetwave::services::tftp::Config::new(root),
            stats,
            stop,
        )
        .await
    })
}
