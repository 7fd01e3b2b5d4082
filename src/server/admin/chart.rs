//! The overview's chart of polls and failures over the last 24 hours,
//! drawn on the server as inline SVG: no script, no chart library, and
//! nothing the Content-Security-Policy has to let in (presentation
//! attributes, no `style`).

use maud::{Markup, html};

use crate::server::activity::Bucket;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 160.0;
const LEFT: f64 = 40.0;
const BOTTOM: f64 = 20.0;

/// Stacked bars, one per bucket: polls (green) under failures (red).
pub fn polls_and_failures(buckets: &[Bucket]) -> Markup {
    let highest = buckets.iter().map(|b| b.polls as u64 + b.failures as u64).max().unwrap_or(0).max(1);
    let plot_width = WIDTH - LEFT;
    let plot_height = HEIGHT - BOTTOM;
    let bar = plot_width / buckets.len().max(1) as f64;
    let scale = |n: u64| n as f64 / highest as f64 * plot_height;
    let polls: u64 = buckets.iter().map(|b| b.polls as u64).sum();
    let failures: u64 = buckets.iter().map(|b| b.failures as u64).sum();
    html! {
        svg id="activity-chart" xmlns="http://www.w3.org/2000/svg" width=(WIDTH) height=(HEIGHT)
            viewBox={"0 0 " (WIDTH) " " (HEIGHT)} role="img"
            aria-label={"Polls and failures over the last 24 hours: " (polls) " polls, " (failures) " failures"} {
            title { "Polls (green) and failures (red), 5-minute buckets, last 24 h" }
            line x1=(LEFT) y1=(plot_height) x2=(WIDTH) y2=(plot_height) stroke="#888" stroke-width="1" {}
            line x1=(LEFT) y1="0" x2=(LEFT) y2=(plot_height) stroke="#888" stroke-width="1" {}
            text x=(LEFT - 4.0) y="12" text-anchor="end" font-size="11" fill="#444" { (highest) }
            text x=(LEFT - 4.0) y=(plot_height) text-anchor="end" font-size="11" fill="#444" { "0" }
            text x=(LEFT) y=(HEIGHT - 4.0) font-size="11" fill="#444" { "24 h ago" }
            text x=(WIDTH) y=(HEIGHT - 4.0) text-anchor="end" font-size="11" fill="#444" { "now" }
            @for (i, b) in buckets.iter().enumerate() {
                @let x = LEFT + i as f64 * bar;
                @if b.polls > 0 {
                    @let h = scale(b.polls as u64);
                    rect class="polls" x=(x) y=(plot_height - h) width=(bar) height=(h) fill="#2e7d32" {}
                }
                @if b.failures > 0 {
                    @let below = scale(b.polls as u64);
                    @let h = scale(b.failures as u64);
                    rect class="failures" x=(x) y=(plot_height - below - h) width=(bar) height=(h) fill="#c62828" {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_bar_per_non_empty_count_and_totals_in_the_label() {
        let mut buckets = vec![Bucket::default(); 288];
        buckets[287] = Bucket { index: 1, polls: 3, failures: 1 };
        buckets[10] = Bucket { index: 2, polls: 0, failures: 2 };
        let svg = polls_and_failures(&buckets).into_string();
        assert_eq!(svg.matches("class=\"polls\"").count(), 1);
        assert_eq!(svg.matches("class=\"failures\"").count(), 2);
        assert!(svg.contains("3 polls, 3 failures"), "{svg}");
        assert!(!svg.contains("style="));
    }
}
