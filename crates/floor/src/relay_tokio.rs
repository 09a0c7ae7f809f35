//! The relay on tokio's current-thread runtime.

use crate::framing::{head_end, response_end, BUF};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Serves until the process is stopped.
pub fn run(port: u16, backend: u16) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        loop {
            let (client, _) = listener.accept().await?;
            tokio::spawn(async move {
                if let Err(e) = relay(client, backend).await {
                    eprintln!("floor tokio: connection ended: {e}");
                }
            });
        }
    })
}

async fn relay(mut client: TcpStream, backend: u16) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let mut upstream = TcpStream::connect(("127.0.0.1", backend)).await?;
    upstream.set_nodelay(true)?;
    let mut buf = vec![0u8; BUF];
    loop {
        let Some(head) = read_until(&mut client, &mut buf, head_end).await? else {
            return Ok(());
        };
        upstream.write_all(&buf[..head]).await?;
        let Some(response) = read_until(&mut upstream, &mut buf, response_end).await? else {
            return Ok(());
        };
        client.write_all(&buf[..response]).await?;
    }
}

/// Reads into `buf` until `end` finds a complete message; `None` when the peer closed first.
async fn read_until(
    stream: &mut TcpStream,
    buf: &mut [u8],
    end: fn(&[u8]) -> Option<usize>,
) -> std::io::Result<Option<usize>> {
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Err(std::io::Error::other("message larger than the buffer"));
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(None);
        }
        len += n;
        if let Some(end) = end(&buf[..len]) {
            return Ok(Some(end));
        }
    }
}
