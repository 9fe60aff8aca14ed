//! The handover: the running ztunnel's reply to a takeover request, as the
//! new one reads it (`handover::parse_reply`), with the number of
//! descriptors that came with it. A reply the server writes reads back
//! the same.
//!
//! Input: the first byte is the number of descriptors (modulo 17: the
//! client takes at most 16), the rest the message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztunnel::handover::{parse_reply, reply_line, Reply};

fuzz_target!(|data: &[u8]| {
    let Some((&fds, message)) = data.split_first() else {
        return;
    };
    let fds = usize::from(fds % 17);
    match parse_reply(message, fds) {
        Ok(Reply::Listeners(names)) => {
            assert_eq!(names.len(), fds);
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            assert_eq!(
                parse_reply(reply_line(&names).as_bytes(), fds),
                Ok(Reply::Listeners(
                    names.iter().map(|n| n.to_string()).collect()
                ))
            );
        }
        Ok(Reply::Draining) | Err(_) => {}
    }
});
