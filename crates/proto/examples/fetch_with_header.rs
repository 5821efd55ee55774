//! A managed runtime in thirty lines: connect to agentkeysd as an agent, receive a credential
//! as a `memfd_secret` fd, use it as an HTTP `Authorization` header, and let it go.
//!
//! ```text
//! AGENTKEYS_TOKEN=akt_... cargo run -p agentkeys-proto --example fetch_with_header -- github 127.0.0.1:8080 /user
//! ```
//!
//! The secret is read from the mapped page; the only other copy is the request buffer, which
//! is reserved up front (no reallocation) and wiped when dropped.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::TcpStream;

use agentkeys_proto::client::Client;
use secrecy::SecretString;
use zeroize::Zeroizing;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(service), Some(addr), path) = (args.next(), args.next(), args.next()) else {
        return Err("usage: fetch_with_header SERVICE HOST:PORT [PATH]".into());
    };
    let path = path.unwrap_or_else(|| "/".into());
    let token = match std::env::var("AGENTKEYS_TOKEN") {
        Ok(t) => SecretString::from(t),
        Err(_) => SecretString::from(
            std::fs::read_to_string(std::env::var("AGENTKEYS_TOKEN_FILE")?)?
                .trim()
                .to_string(),
        ),
    };
    let socket = std::env::var_os("AGENTKEYS_SOCKET").ok_or("set AGENTKEYS_SOCKET")?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let secret = rt.block_on(async {
        let (mut client, _) = Client::connect_with(socket.as_ref(), &token).await?;
        client.get_credential(&service, false).await
    })?;

    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer "
    );
    let mut request = Zeroizing::new(Vec::with_capacity(head.len() + secret.bytes().len() + 4));
    request.extend_from_slice(head.as_bytes());
    request.extend_from_slice(secret.bytes());
    request.extend_from_slice(b"\r\n\r\n");
    drop(secret); // unmapped and closed: from here on only the request buffer holds it

    let mut conn = TcpStream::connect(&addr)?;
    conn.write_all(&request)?;
    drop(request);
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    println!("{}", response.lines().next().unwrap_or("(no response)"));
    Ok(())
}
