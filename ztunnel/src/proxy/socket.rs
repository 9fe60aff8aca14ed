//! Sockets that see and keep the original addresses.
//!
//! A transparent (`IP_TRANSPARENT`) listener accepts flows the TC programs
//! assigned to it whatever their destination; the accepted socket's local
//! address *is* the original destination. A transparent client socket may
//! bind a pod's address, so the far end sees the real client.

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Backlog of the capture listeners: a burst of new connections from many
/// pods must not overflow it.
const LISTEN_BACKLOG: i32 = 4096;

/// Keepalive probing for relayed connections: a peer that vanished without a
/// FIN or RST (a deleted pod, a dead node) is noticed after about
/// `time + interval * retries` instead of holding its sockets forever.
pub fn set_keepalive(socket: &impl std::os::fd::AsFd) -> io::Result<()> {
    use std::time::Duration;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    socket2::SockRef::from(socket).set_tcp_keepalive(&keepalive)
}

/// Sets on a listener what every socket it accepts needs: keepalive
/// probing and `TCP_NODELAY`. An accepted socket is cloned from its
/// listener with these options, which saves five `setsockopt` calls per
/// connection. Applied to listeners handed over by a previous ztunnel too,
/// which may not have set them.
pub fn prepare_listener(listener: &TcpListener, name: &str) {
    let sock = socket2::SockRef::from(listener);
    if let Err(e) = set_keepalive(listener).and_then(|()| sock.set_nodelay(true)) {
        tracing::warn!(listener = name, error = %e, "could not set keepalive and TCP_NODELAY on the listener: accepted connections go without");
    }
}

/// A transparent listener on `0.0.0.0:port`, one member of the port's
/// `SO_REUSEPORT` group: each proxy worker has its own. The netns's
/// sk_lookup program selects the group's first member (the one in the
/// listener map), and the kernel then picks the member by the flow's hash,
/// so a captured SYN lands on one worker's accept queue with no handoff
/// between threads. What its accepted sockets need is set by
/// [`prepare_listener`] where it is served, as for a listener handed over.
///
/// Bind the group's first member only after [`ensure_port_free`]: a
/// draining ztunnel's listeners are reuseport members too, and joining
/// their group would hand new flows to a process that no longer accepts.
pub fn transparent_listener(port: u16) -> io::Result<std::net::TcpListener> {
    let socket = transparent_socket()?;
    socket.set_reuse_port(true)?;
    let addr: SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, port).into();
    socket
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("binding {addr}: {e}")))?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Fails with `AddrInUse` while any socket listens on `0.0.0.0:port` (a
/// bind without `SO_REUSEPORT` conflicts with every listener there,
/// reuseport group or not).
pub fn ensure_port_free(port: u16) -> io::Result<()> {
    let socket = transparent_socket()?;
    let addr: SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, port).into();
    socket
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("binding {addr}: {e}")))
}

fn transparent_socket() -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_ip_transparent(true)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Connects to `dst`, from `src_ip` when given (a pod's address, not this
/// host's: needs `IP_TRANSPARENT`), else from an address of this host.
pub async fn connect(src_ip: Option<IpAddr>, dst: SocketAddr) -> io::Result<TcpStream> {
    let domain = if dst.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    // Non-blocking from birth (SOCK_NONBLOCK): no fcntl pair per connection.
    let socket = Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    socket.set_nodelay(true)?;
    if let Some(ip) = src_ip {
        socket.set_ip_transparent(true)?;
        // Let connect() pick the port, so a port is unique per 4-tuple rather
        // than per address: a busy pod's address would otherwise run out of
        // ports after ~28k connections (TIME_WAIT included).
        set_bind_address_no_port(&socket)?;
        // Port 0: the kernel picks a free one; only the address is kept.
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    let socket = TcpSocket::from_std_stream(socket.into());
    socket.connect(dst).await
}

fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and a c_int option value.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether `ip` is an address of this network namespace (binding it without
/// `IP_TRANSPARENT` succeeds only then).
pub fn is_local_address(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}
