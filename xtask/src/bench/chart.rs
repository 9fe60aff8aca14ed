//! The ratio chart: one bar per figure, mesh / no mesh, with its target.

use std::fmt::Write;

use super::Row;

pub fn svg(rows: &[Row], subtitle: &str) -> String {
    let ratios: Vec<&Row> = rows.iter().filter(|r| r.ratio.is_some()).collect();
    let (w, bar_h, gap, left, top) = (760.0, 26.0, 10.0, 250.0, 60.0);
    let h = top + ratios.len() as f64 * (bar_h + gap) + 56.0;
    let max = ratios
        .iter()
        .flat_map(|r| [r.ratio, r.relays_ratio])
        .flatten()
        .fold(2.6_f64, f64::max);
    let scale = (w - left - 40.0) / max;
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="13">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="22" font-size="16" font-weight="bold">ztunnel cost: mesh / no mesh (same run, medians)</text>
<text x="10" y="42" fill="#555">{subtitle}</text>
"##
    );
    let x1 = left + scale;
    let _ = write!(
        s,
        r##"<line x1="{x1}" y1="{top}" x2="{x1}" y2="{}" stroke="#888" stroke-dasharray="4 3"/><text x="{x1}" y="{}" text-anchor="middle" fill="#555">1.0</text>"##,
        h - 30.0,
        h - 14.0
    );
    for (i, r) in ratios.iter().enumerate() {
        let ratio = r.ratio.unwrap_or(0.0);
        let y = top + i as f64 * (bar_h + gap);
        let colour = match r.met {
            Some(true) => "#2e8b57",
            Some(false) => "#c0392b",
            None => "#4a7ab0",
        };
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{left}" y="{y}" width="{}" height="{bar_h}" fill="{colour}"/><text x="{}" y="{}">{ratio:.2}{}</text>
"#,
            left - 8.0,
            y + bar_h * 0.68,
            r.name,
            (ratio * scale).max(1.0),
            // The label clears both the bar and the floor's tick.
            left + ratio.max(r.relays_ratio.unwrap_or(0.0)) * scale + 8.0,
            y + bar_h * 0.68,
            r.target
                .as_ref()
                .map(|t| format!(" (target {t})"))
                .unwrap_or_default()
        );
        if let Some(floor) = r.relays_ratio {
            // The two-relay floor: a black tick across the bar.
            let x = left + floor * scale;
            let _ = write!(
                s,
                r##"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="black" stroke-width="3"/>
"##,
                y - 3.0,
                y + bar_h + 3.0
            );
        }
    }
    let _ = write!(
        s,
        r##"<text x="10" y="{}" fill="#555">black tick: two plain TCP relays (no TLS, no HTTP/2) / no mesh, the floor for a proxy on each node</text>
"##,
        h - 2.0
    );
    s.push_str("</svg>\n");
    s
}
