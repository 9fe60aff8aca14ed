//! The ratio chart: one bar per figure, mesh / no mesh, with its target;
//! where the two-relay floor was measured, the ratio to it too.

use std::{borrow::Cow, fmt::Write};

use super::Row;

pub fn svg(rows: &[Row], subtitle: &str) -> String {
    let subtitle = escape(subtitle);
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
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{left}" y="{y}" width="{}" height="{bar_h}" fill="{colour}"/><text x="{}" y="{}">{ratio:.2}{}{}</text>"#,
            left - 8.0,
            y + bar_h * 0.68,
            escape(&r.name),
            (ratio * scale).max(1.0),
            // The label clears both the bar and the floor's tick.
            left + ratio.max(r.relays_ratio.unwrap_or(0.0)) * scale + 8.0,
            y + bar_h * 0.68,
            // Against the floor too, where there is one: some targets are
            // bounds on that.
            r.floor_ratio
                .map(|f| format!(" = {f:.2} of relays"))
                .unwrap_or_default(),
            r.target
                .as_ref()
                .map(|t| format!(" (target {})", escape(t)))
                .unwrap_or_default()
        );
        if let Some(floor) = r.relays_ratio {
            // The two-relay floor: a black tick across the bar.
            let x = left + floor * scale;
            let _ = writeln!(
                s,
                r##"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="black" stroke-width="3"/>"##,
                y - 3.0,
                y + bar_h + 3.0
            );
        }
    }
    let _ = writeln!(
        s,
        r##"<text x="10" y="{}" fill="#555">black tick: two plain TCP relays (no TLS, no HTTP/2) / no mesh, the floor for a proxy on each node</text>"##,
        h - 2.0
    );
    s.push_str("</svg>\n");
    s
}

/// Text as SVG (XML) character data: a target such as "<= 1.8" must not open
/// a tag, or browsers show a broken image instead of the chart.
fn escape(text: &str) -> Cow<'_, str> {
    if !text.contains(['<', '>', '&', '"', '\'']) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Parses a chart as XML and returns the texts it shows, so the tests can
/// check that what the bench wrote is well formed and says what it should.
pub fn texts(svg: &str) -> Result<Vec<String>, roxmltree::Error> {
    let doc = roxmltree::Document::parse(svg)?;
    Ok(doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| n.text().unwrap_or_default().to_string())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, ratio: f64, target: &str) -> Row {
        Row {
            name: name.into(),
            unit: "us".into(),
            no_mesh: Some(1.0),
            mesh: ratio,
            ratio: Some(ratio),
            relays: None,
            relays_ratio: Some(ratio / 2.0),
            floor_ratio: Some(2.0),
            target: Some(target.into()),
            met: Some(true),
            pairs: Vec::new(),
        }
    }

    #[test]
    fn targets_with_comparison_signs_stay_well_formed() {
        let rows = [
            row("p99 latency", 1.7, "<= 1.8"),
            row("throughput \"4\" & <streams>", 0.5, ">= 0.4"),
        ];
        let svg = svg(&rows, "ztunnel abc · kernel 6.18 <test>");
        let texts = texts(&svg).expect("the chart is well-formed XML");
        assert!(
            texts.contains(&"1.70 = 2.00 of relays (target <= 1.8)".to_string()),
            "{texts:?}"
        );
        assert!(texts.contains(&"throughput \"4\" & <streams>".to_string()));
        assert!(texts.contains(&"ztunnel abc · kernel 6.18 <test>".to_string()));
    }

    #[test]
    fn plain_text_is_not_copied() {
        assert!(matches!(escape("p50 latency"), Cow::Borrowed(_)));
        assert_eq!(escape("a<b&c"), "a&lt;b&amp;c");
    }
}
