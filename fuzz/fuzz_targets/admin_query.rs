//! The admin port's query: `/logging?level=` read as the admin handler
//! reads it (`admin::log_level`), then the filter built from it
//! (`admin::log_filter`, which `RUST_LOG` goes through too). A level
//! written back as a form reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztunnel::admin::{log_filter, log_level};

fuzz_target!(|data: &[u8]| {
    // hyper hands the handler the query as a &str.
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    let Some(level) = log_level(query) else {
        return;
    };
    let written = form_urlencoded::Serializer::new(String::new())
        .append_pair("level", &level)
        .finish();
    assert_eq!(
        log_level(&written).as_deref(),
        Some(level.as_str()),
        "{written}"
    );
    let _ = log_filter(&level);
});
