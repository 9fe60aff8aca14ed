//! The in-repo load tool: request/response latency on one connection, new
//! connections per second, and many idle connections held open. Clients and
//! servers run as threads inside lab namespaces.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, RawFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::netns::Netns;

/// What a server does with each connection.
#[derive(Clone, Copy)]
pub enum Mode {
    /// Echo every byte back until the client closes.
    Echo,
    /// [`Mode::Echo`] on a thread kept on this CPU.
    EchoOnCpu(usize),
    /// Accept and hold the connection, never reading.
    Hold,
}

/// A load server inside a pod.
pub struct LoadServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    /// The accept thread's listener, to wake it on drop.
    listener_fd: RawFd,
    thread: Option<JoinHandle<()>>,
}

impl LoadServer {
    pub fn start(ns: &Netns, addr: SocketAddr, mode: Mode) -> Result<Self> {
        let listener = ns.run(move || TcpListener::bind(addr))??;
        let listener_fd = listener.as_raw_fd();
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, held) = (stop.clone(), held.clone());
            // A blocking accept: the connection-rate measurement must not
            // include a polling interval. Drop wakes it with shutdown(2).
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let _ = stream.set_nodelay(true);
                            match mode {
                                Mode::Echo => {
                                    std::thread::spawn(move || echo(stream));
                                }
                                Mode::EchoOnCpu(cpu) => {
                                    std::thread::spawn(move || {
                                        // Unpinned, it would measure the
                                        // scheduler's placement this mode
                                        // exists to fix: the client sees
                                        // the connection close instead.
                                        if pin_to_cpu(cpu).is_ok() {
                                            echo(stream);
                                        }
                                    });
                                }
                                Mode::Hold => {
                                    if let Ok(mut h) = held.lock() {
                                        h.push(stream);
                                    }
                                }
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
            })
        };
        Ok(LoadServer {
            addr,
            stop,
            held,
            listener_fd,
            thread: Some(thread),
        })
    }

    /// Connections held so far (`Mode::Hold`).
    pub fn held(&self) -> usize {
        self.held.lock().map(|h| h.len()).unwrap_or(0)
    }
}

impl Drop for LoadServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // SAFETY: the accept thread owns the listener until it is joined
        // below, so the descriptor is still open; shutdown(2) on a listening
        // socket makes a blocked accept(2) return.
        unsafe {
            libc::shutdown(self.listener_fd, libc::SHUT_RDWR);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn echo(mut stream: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Round-trip latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
}

/// `count` round trips of `size` bytes on one connection (after a warm-up),
/// against an echo server; from a client thread kept on `cpu`, if given.
pub fn latency(
    ns: &Netns,
    dst: SocketAddr,
    size: usize,
    count: usize,
    cpu: Option<usize>,
) -> Result<Latency> {
    ns.run(move || -> Result<Latency> {
        if let Some(cpu) = cpu {
            pin_to_cpu(cpu).with_context(|| format!("keeping the client on CPU {cpu}"))?;
        }
        let mut stream = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let msg = vec![0x5au8; size];
        let mut back = vec![0u8; size];
        let mut samples = Vec::with_capacity(count);
        for i in 0..count + count / 10 {
            let start = Instant::now();
            stream.write_all(&msg)?;
            stream.read_exact(&mut back)?;
            if i >= count / 10 {
                samples.push(start.elapsed().as_secs_f64() * 1e6);
            }
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
        Ok(Latency {
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
        })
    })?
}

/// The CPUs the calling thread may run on, lowest first.
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: sched_getaffinity fills the set it is given (pid 0: the
    // calling thread); CPU_ISSET only reads inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect())
    }
}

/// Keeps the calling thread on `cpu` from now on.
pub fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    set_thread_affinity(0, &[cpu])
}

/// Lets thread `tid` (0: the calling thread) run only on `cpus`. It makes
/// no allocation, so it may run between fork and exec.
pub fn set_thread_affinity(tid: libc::pid_t, cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set, CPU_SET stays inside it
    // (it ignores CPUs past its size), and sched_setaffinity only reads it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// New connections per second for `duration`, each: connect, send 64
/// bytes, read them back, close; from `threads` client threads.
pub fn connection_rate(
    ns: &Netns,
    dst: SocketAddr,
    duration: Duration,
    threads: usize,
) -> Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (done, failed) = (done.clone(), failed.clone());
            ns.spawn(move || {
                let msg = [0x33u8; 64];
                let mut back = [0u8; 64];
                while Instant::now() < deadline {
                    let ok = (|| -> std::io::Result<()> {
                        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
                        s.set_nodelay(true)?;
                        s.write_all(&msg)?;
                        s.read_exact(&mut back)?;
                        s.shutdown(Shutdown::Both)
                    })();
                    match ok {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect::<Result<_>>()?;
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    }
    let failed = failed.load(Ordering::Relaxed);
    anyhow::ensure!(
        failed == 0,
        "{failed} connections failed during the rate test"
    );
    Ok(done.load(Ordering::Relaxed) as f64 / duration.as_secs_f64())
}

/// Opens `count` connections from `ns` to a holding server and keeps them.
pub fn open_idle(ns: &Netns, dst: SocketAddr, count: usize) -> Result<Vec<TcpStream>> {
    ns.run(move || -> Result<Vec<TcpStream>> {
        let mut conns = Vec::with_capacity(count);
        for i in 0..count {
            let s = TcpStream::connect_timeout(&dst, Duration::from_secs(10))
                .with_context(|| format!("idle connection {i}"))?;
            conns.push(s);
        }
        Ok(conns)
    })?
}

/// Raises this process's open-file limit towards `want`: the hard limit
/// too when privileged, else the soft limit up to the hard one. Returns the
/// soft limit in effect.
pub fn raise_fd_limit(want: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on our own process with structs we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        let both = libc::rlimit {
            rlim_cur: want,
            rlim_max: want.max(limit.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &both) == 0 {
            return want;
        }
        let soft = libc::rlimit {
            rlim_cur: want.min(limit.rlim_max),
            rlim_max: limit.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &soft) == 0 {
            return soft.rlim_cur;
        }
        limit.rlim_cur
    }
}

/// Accepts and holds connections on `addr` until killed: the body of the
/// hold server the benchmark runs as its own process, so the connections'
/// two ends do not share one process's descriptor limit.
pub fn hold_forever(addr: SocketAddr) -> Result<()> {
    raise_fd_limit(1 << 20);
    let listener = TcpListener::bind(addr)?;
    let mut held = Vec::new();
    loop {
        match listener.accept() {
            Ok((stream, _)) => held.push(stream),
            Err(e) => {
                eprintln!("hold server: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
