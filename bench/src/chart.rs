//! One small SVG line-chart drawer for every plot Gristmill writes (the throughput sweep of
//! `bench throughput --plot`, the replicas of `bench autoscale --plot`): a frame with a title,
//! axes, five horizontal grid lines with values, an x axis of its kind, one polyline per
//! series, markers with values where asked, and a legend when there is more than one series.

/// How the x axis maps values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XAxis {
    /// Log base 2, labelled at the points (a sweep that doubles, such as 1, 4, 16, 64).
    Log2,
    /// Hours of one day, 0 to 24, labelled every three hours.
    Day,
}

/// One named, coloured line of `(x, y)` points.
#[derive(Debug, Clone)]
pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// A line chart (see the module's doc).
#[derive(Debug, Clone)]
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub x_axis: XAxis,
    pub series: Vec<Series<'a>>,
    /// A marker with its value at every point.
    pub markers: bool,
}

impl Chart<'_> {
    pub fn svg(&self) -> String {
        let legend = self.series.len() > 1;
        let (w, h) = (if legend { 760.0 } else { 640.0 }, 400.0);
        let (left, right, top, bottom) = (70.0, if legend { 150.0 } else { 20.0 }, 40.0, 50.0);
        let points = || self.series.iter().flat_map(|s| s.points.iter().copied());
        let x_max = points().map(|p| p.0).fold(1.0, f64::max);
        let y_max = points().map(|p| p.1).fold(1.0, f64::max) * 1.15;
        let fx = |x: f64| match self.x_axis {
            XAxis::Log2 => x.max(1.0).log2() / x_max.log2().max(1.0),
            XAxis::Day => x / 24.0,
        };
        let px = |x: f64| left + fx(x) * (w - left - right);
        let py = |y: f64| h - bottom - y / y_max * (h - top - bottom);
        let mid_y = (top + h - bottom) / 2.0;
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n\
             <line x1=\"{left}\" y1=\"{2}\" x2=\"{3}\" y2=\"{2}\" stroke=\"black\"/>\n\
             <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{2}\" stroke=\"black\"/>\n\
             <text x=\"{4}\" y=\"{5}\" text-anchor=\"middle\">{6}</text>\n\
             <text x=\"16\" y=\"{mid_y}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {mid_y})\">{7}</text>\n",
            (left + w - right) / 2.0,
            escape(self.title),
            h - bottom,
            w - right,
            (left + w - right) / 2.0,
            h - 12.0,
            escape(self.x_label),
            escape(self.y_label),
        );
        for i in 0..=4 {
            let y = y_max * i as f64 / 4.0;
            s += &format!(
                "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/><text x=\"{2}\" y=\"{3:.1}\" text-anchor=\"end\">{4:.0}</text>\n",
                py(y),
                w - right,
                left - 6.0,
                py(y) + 4.0,
                y
            );
        }
        if self.x_axis == XAxis::Day {
            for hour in (0..=24).step_by(3) {
                s += &format!(
                    "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{hour:02}:00</text>\n",
                    px(hour as f64),
                    h - bottom + 16.0
                );
            }
        }
        for (k, series) in self.series.iter().enumerate() {
            let path: Vec<String> = series
                .points
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            s += &format!(
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"/>\n",
                path.join(" "),
                series.color
            );
            if self.markers {
                for &(x, y) in &series.points {
                    s += &format!(
                        "<circle cx=\"{0:.1}\" cy=\"{1:.1}\" r=\"4\" fill=\"{2}\"/><text x=\"{0:.1}\" y=\"{3:.1}\" text-anchor=\"middle\">{4:.0}</text>\n",
                        px(x),
                        py(y),
                        series.color,
                        py(y) - 9.0,
                        y
                    );
                }
            }
            if self.x_axis == XAxis::Log2 {
                for &(x, _) in &series.points {
                    s += &format!(
                        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{x}</text>\n",
                        px(x),
                        h - bottom + 16.0
                    );
                }
            }
            if legend {
                let ly = top + 20.0 + 18.0 * k as f64;
                s += &format!(
                    "<line x1=\"{0}\" y1=\"{ly}\" x2=\"{1}\" y2=\"{ly}\" stroke=\"{2}\" stroke-width=\"3\"/><text x=\"{3}\" y=\"{4}\">{5}</text>\n",
                    w - right + 10.0,
                    w - right + 30.0,
                    series.color,
                    w - right + 36.0,
                    ly + 4.0,
                    escape(series.name)
                );
            }
        }
        s + "</svg>\n"
    }
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(x_axis: XAxis, series: Vec<Series<'static>>) -> Chart<'static> {
        Chart {
            title: "a < b",
            x_label: "x",
            y_label: "y",
            x_axis,
            series,
            markers: x_axis == XAxis::Log2,
        }
    }

    #[test]
    fn one_series_has_a_marker_per_point_and_no_legend() {
        let one = Series {
            name: "tok/s",
            color: "#1f77b4",
            points: vec![(1.0, 10.0), (4.0, 30.0), (16.0, 80.0)],
        };
        let svg = chart(XAxis::Log2, vec![one]).svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<circle").count(), 3);
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(
            svg.contains("a &lt; b") && !svg.contains("tok/s"),
            "no legend for one"
        );
        assert!(svg.contains(">16</text>"), "x labels at the points");
    }

    #[test]
    fn several_series_get_a_legend_and_a_day_axis() {
        let s = |name: &'static str, color: &'static str| Series {
            name,
            color,
            points: vec![(0.0, 1.0), (12.0, 5.0), (24.0, 2.0)],
        };
        let svg = chart(
            XAxis::Day,
            vec![s("ours", "#1f77b4"), s("KEDA & co", "#d62728")],
        )
        .svg();
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(">ours</text>") && svg.contains("KEDA &amp; co"));
        assert!(svg.contains(">00:00</text>") && svg.contains(">24:00</text>"));
        assert_eq!(svg.matches("<circle").count(), 0);
    }
}
