//! Small PNG charts for experiment tracking (confusion matrix, ROC curve, score against a
//! hyper-parameter), drawn on an RGB canvas with a built-in bitmap font and encoded with the
//! zlib of `flate2`: no system fonts or graphics libraries needed.

mod font;

use std::io::Write;

type Rgb = [u8; 3];

const WHITE: Rgb = [255, 255, 255];
const BLACK: Rgb = [30, 30, 30];
const GREY: Rgb = [190, 190, 190];
const LIGHT: Rgb = [235, 235, 235];
/// Series colours (Tableau 10).
const PALETTE: [Rgb; 6] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
];

struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<Rgb>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Canvas {
        Canvas {
            width,
            height,
            pixels: vec![WHITE; width * height],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            self.pixels[y as usize * self.width + x as usize] = c;
        }
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for y in y0.min(y1)..=y0.max(y1) {
            for x in x0.min(x1)..=x0.max(x1) {
                self.set(x, y, c);
            }
        }
    }

    /// A line `width` pixels thick; every `dash`-th run of pixels is skipped when `dash` > 0.
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb, width: i64, dash: usize) {
        let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=steps {
            if dash > 0 && (i / dash) % 2 == 1 {
                continue;
            }
            let t = i as f64 / steps as f64;
            let (x, y) = ((x0 + t * (x1 - x0)).round() as i64, (y0 + t * (y1 - y0)).round() as i64);
            let half = width / 2;
            self.rect(x - half, y - half, x - half + width - 1, y - half + width - 1, c);
        }
    }

    /// Text with its top-left corner at (x, y), each font pixel drawn `scale` × `scale`.
    fn text(&mut self, x: i64, y: i64, s: &str, c: Rgb, scale: i64) {
        for (i, ch) in s.chars().enumerate() {
            let code = ch as usize;
            let glyph = if (32..127).contains(&code) {
                font::GLYPHS[code - 32]
            } else {
                font::GLYPHS[b'?' as usize - 32]
            };
            let gx = x + i as i64 * font::WIDTH as i64 * scale;
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..font::WIDTH {
                    if bits >> col & 1 == 1 {
                        let (px, py) = (gx + col as i64 * scale, y + row as i64 * scale);
                        self.rect(px, py, px + scale - 1, py + scale - 1, c);
                    }
                }
            }
        }
    }

    fn text_width(s: &str, scale: i64) -> i64 {
        s.chars().count() as i64 * font::WIDTH as i64 * scale
    }

    fn text_centered(&mut self, cx: i64, y: i64, s: &str, c: Rgb, scale: i64) {
        self.text(cx - Canvas::text_width(s, scale) / 2, y, s, c, scale);
    }

    /// Text rotated a quarter turn anticlockwise (for a y-axis label), centred on `cy`.
    fn text_vertical(&mut self, x: i64, cy: i64, s: &str, c: Rgb) {
        let mut strip = Canvas::new(Canvas::text_width(s, 1) as usize, font::HEIGHT);
        strip.text(0, 0, s, c, 1);
        let top = cy + strip.width as i64 / 2;
        for sy in 0..strip.height {
            for sx in 0..strip.width {
                let p = strip.pixels[sy * strip.width + sx];
                if p != WHITE {
                    self.set(x + sy as i64, top - sx as i64, p);
                }
            }
        }
    }

    fn png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity((self.width * 3 + 1) * self.height);
        for row in self.pixels.chunks(self.width) {
            raw.push(0); // filter: none
            raw.extend(row.iter().flatten());
        }
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&raw).expect("writing to memory");
        let idat = z.finish().expect("writing to memory");
        let mut ihdr = Vec::with_capacity(13);
        ihdr.extend((self.width as u32).to_be_bytes());
        ihdr.extend((self.height as u32).to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter method, no interlace
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        for (kind, data) in [(b"IHDR", &ihdr[..]), (b"IDAT", &idat[..]), (b"IEND", &[][..])] {
            out.extend((data.len() as u32).to_be_bytes());
            let mut crc = flate2::Crc::new();
            crc.update(kind);
            crc.update(data);
            out.extend(kind);
            out.extend(data);
            out.extend(crc.sum().to_be_bytes());
        }
        out
    }
}

/// Plot area of a chart: pixel box and data ranges, with axes, ticks and labels drawn.
struct Axes {
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
    x: (f64, f64),
    y: (f64, f64),
    log_x: bool,
}

impl Axes {
    fn px(&self, x: f64, y: f64) -> (f64, f64) {
        let fx = |v: f64| if self.log_x { v.log10() } else { v };
        let tx = (fx(x) - fx(self.x.0)) / (fx(self.x.1) - fx(self.x.0));
        let ty = (y - self.y.0) / (self.y.1 - self.y.0);
        (
            self.left + tx * (self.right - self.left),
            self.bottom - ty * (self.bottom - self.top),
        )
    }

    fn draw(&self, c: &mut Canvas, x_ticks: &[f64], y_ticks: &[f64], x_label: &str, y_label: &str) {
        for &t in y_ticks {
            let (_, y) = self.px(self.x.0, t);
            c.line((self.left, y), (self.right, y), LIGHT, 1, 0);
            let label = format_tick(t);
            c.text(
                self.left as i64 - 8 - Canvas::text_width(&label, 1),
                y as i64 - 6,
                &label,
                BLACK,
                1,
            );
        }
        for &t in x_ticks {
            let (x, _) = self.px(t, self.y.0);
            c.line((x, self.top), (x, self.bottom), LIGHT, 1, 0);
            c.text_centered(x as i64, self.bottom as i64 + 8, &format_tick(t), BLACK, 1);
        }
        c.line((self.left, self.bottom), (self.right, self.bottom), BLACK, 1, 0);
        c.line((self.left, self.top), (self.left, self.bottom), BLACK, 1, 0);
        c.text_centered(
            ((self.left + self.right) / 2.0) as i64,
            self.bottom as i64 + 28,
            x_label,
            BLACK,
            1,
        );
        c.text_vertical(12, ((self.top + self.bottom) / 2.0) as i64, y_label, BLACK);
    }
}

fn format_tick(v: f64) -> String {
    if v == 0.0 || (v == v.trunc() && v.abs() >= 1.0) {
        format!("{v:.0}")
    } else if v.abs() >= 0.01 {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.0e}")
    }
}

fn title(c: &mut Canvas, s: &str) {
    c.text_centered(c.width as i64 / 2, 10, s, BLACK, 2);
}

/// A 2×2 confusion matrix, `[[TN, FP], [FN, TP]]`, cells shaded by their share of the row.
pub fn confusion_matrix(m: [[u64; 2]; 2], heading: &str) -> Vec<u8> {
    let mut c = Canvas::new(480, 420);
    title(&mut c, heading);
    let (x0, y0, cell) = (150i64, 70i64, 140i64);
    let names = ["negative", "positive"];
    for (row, counts) in m.iter().enumerate() {
        let total = counts.iter().sum::<u64>().max(1) as f64;
        for (col, &n) in counts.iter().enumerate() {
            let share = n as f64 / total;
            let shade = |base: u8| (255.0 - share * (255.0 - base as f64)) as u8;
            let fill = [shade(31), shade(119), shade(180)];
            let (x, y) = (x0 + col as i64 * cell, y0 + row as i64 * cell);
            c.rect(x, y, x + cell - 1, y + cell - 1, fill);
            let ink = if share > 0.55 { WHITE } else { BLACK };
            c.text_centered(x + cell / 2, y + cell / 2 - 20, &n.to_string(), ink, 2);
            c.text_centered(
                x + cell / 2,
                y + cell / 2 + 10,
                &format!("{:.1}%", share * 100.0),
                ink,
                1,
            );
        }
        c.text(
            x0 - 10 - Canvas::text_width(names[row], 1),
            y0 + row as i64 * cell + cell / 2 - 6,
            names[row],
            BLACK,
            1,
        );
        c.text_centered(
            x0 + row as i64 * cell + cell / 2,
            y0 + 2 * cell + 8,
            names[row],
            BLACK,
            1,
        );
    }
    c.text_centered(x0 + cell, y0 + 2 * cell + 30, "predicted label", BLACK, 1);
    c.text_vertical(30, y0 + cell, "true label", BLACK);
    c.png()
}

/// The ROC curve (false positive rate, true positive rate) with its area.
pub fn roc_curve(points: &[(f64, f64)], auc: f64, heading: &str) -> Vec<u8> {
    let mut c = Canvas::new(520, 480);
    title(&mut c, heading);
    let axes = Axes {
        left: 80.0,
        right: 490.0,
        top: 50.0,
        bottom: 410.0,
        x: (0.0, 1.0),
        y: (0.0, 1.0),
        log_x: false,
    };
    let ticks = [0.0, 0.25, 0.5, 0.75, 1.0];
    axes.draw(&mut c, &ticks, &ticks, "false positive rate", "true positive rate");
    c.line(axes.px(0.0, 0.0), axes.px(1.0, 1.0), GREY, 1, 6);
    for w in points.windows(2) {
        c.line(axes.px(w[0].0, w[0].1), axes.px(w[1].0, w[1].1), PALETTE[0], 2, 0);
    }
    let label = format!("AUC {auc:.4}");
    c.text(
        axes.right as i64 - Canvas::text_width(&label, 2) - 10,
        axes.bottom as i64 - 40,
        &label,
        BLACK,
        2,
    );
    c.png()
}

/// One line per series of (parameter value, score) points, e.g. mean CV accuracy against C.
pub fn score_vs_param(series: &[(String, Vec<(f64, f64)>)], x_label: &str, y_label: &str, heading: &str) -> Vec<u8> {
    let mut c = Canvas::new(640, 480);
    title(&mut c, heading);
    let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    let (mut x_min, mut x_max) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y_min, mut y_max) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if all.is_empty() {
        (x_min, x_max, y_min, y_max) = (1.0, 10.0, 0.0, 1.0);
    }
    let log_x = x_min > 0.0 && x_max / x_min >= 10.0;
    if x_max == x_min {
        (x_min, x_max) = if log_x {
            (x_min / 2.0, x_max * 2.0)
        } else {
            (x_min - 1.0, x_max + 1.0)
        };
    }
    let pad = ((y_max - y_min) * 0.1).max(0.005);
    let axes = Axes {
        left: 90.0,
        right: 450.0,
        top: 50.0,
        bottom: 410.0,
        x: if log_x {
            (x_min / 1.5, x_max * 1.5)
        } else {
            (x_min, x_max)
        },
        y: (y_min - pad, y_max + pad),
        log_x,
    };
    let x_ticks: Vec<f64> = if log_x {
        let (lo, hi) = (axes.x.0.log10().ceil() as i32, axes.x.1.log10().floor() as i32);
        (lo..=hi).map(|e| 10f64.powi(e)).collect()
    } else {
        (0..=4).map(|i| x_min + (x_max - x_min) * i as f64 / 4.0).collect()
    };
    let y_ticks: Vec<f64> = (0..=4)
        .map(|i| axes.y.0 + (axes.y.1 - axes.y.0) * i as f64 / 4.0)
        .collect();
    axes.draw(&mut c, &x_ticks, &y_ticks, x_label, y_label);
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let mut sorted = points.clone();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        for w in sorted.windows(2) {
            c.line(axes.px(w[0].0, w[0].1), axes.px(w[1].0, w[1].1), colour, 2, 0);
        }
        for &(x, y) in &sorted {
            let (px, py) = axes.px(x, y);
            c.rect(px as i64 - 3, py as i64 - 3, px as i64 + 3, py as i64 + 3, colour);
        }
        let ly = 60 + i as i64 * 22;
        c.rect(462, ly + 2, 474, ly + 10, colour);
        c.text(480, ly, name, BLACK, 1);
    }
    c.png()
}

/// One distribution of a drift chart: bin labels, reference and current shares.
pub struct Panel {
    pub title: String,
    pub labels: Vec<String>,
    pub reference: Vec<f64>,
    pub current: Vec<f64>,
}

/// One panel per distribution, reference and current shares as paired bars per bin (drift
/// reports).
pub fn distributions(heading: &str, panels: &[Panel]) -> Vec<u8> {
    let panel_h = 260;
    let mut c = Canvas::new(760, 60 + panel_h * panels.len().max(1));
    title(&mut c, heading);
    for (
        i,
        Panel {
            title: name,
            labels,
            reference,
            current,
        },
    ) in panels.iter().enumerate()
    {
        let top = 50.0 + (i * panel_h) as f64;
        let top_share = reference.iter().chain(current).fold(0.05f64, |a, &b| a.max(b)) * 1.15;
        let axes = Axes {
            left: 80.0,
            right: 600.0,
            top: top + 25.0,
            bottom: top + panel_h as f64 - 60.0,
            x: (0.0, labels.len().max(1) as f64),
            y: (0.0, top_share),
            log_x: false,
        };
        c.text(80, top as i64, name, BLACK, 1);
        let y_ticks: Vec<f64> = (0..=3).map(|k| top_share * k as f64 / 3.0).collect();
        axes.draw(&mut c, &[], &y_ticks, "", "share");
        for (bin, label) in labels.iter().enumerate() {
            for (k, (values, colour)) in [(reference, GREY), (current, PALETTE[0])].into_iter().enumerate() {
                let v = values.get(bin).copied().unwrap_or(0.0);
                let (x0, y0) = axes.px(bin as f64 + 0.1 + 0.4 * k as f64, 0.0);
                let (x1, y1) = axes.px(bin as f64 + 0.5 + 0.4 * k as f64, v);
                c.rect(x0 as i64, y1 as i64, x1 as i64 - 1, y0 as i64 - 1, colour);
            }
            let (x, y) = axes.px(bin as f64 + 0.5, 0.0);
            c.text_centered(x as i64, y as i64 + 6, label, BLACK, 1);
        }
        for (k, (name, colour)) in [("reference", GREY), ("current", PALETTE[0])].into_iter().enumerate() {
            let ly = top as i64 + 30 + k as i64 * 20;
            c.rect(615, ly + 2, 627, ly + 10, colour);
            c.text(633, ly, name, BLACK, 1);
        }
    }
    c.png()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes our own PNG's pixels back (zlib, filter 0) to check the encoding and drawing.
    fn decode(png: &[u8]) -> (usize, usize, Vec<u8>) {
        use std::io::Read;
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let (mut pos, mut w, mut h, mut idat) = (8, 0, 0, Vec::new());
        while pos < png.len() {
            let len = u32::from_be_bytes(png[pos..pos + 4].try_into().unwrap()) as usize;
            let kind = &png[pos + 4..pos + 8];
            let data = &png[pos + 8..pos + 8 + len];
            let mut crc = flate2::Crc::new();
            crc.update(kind);
            crc.update(data);
            assert_eq!(crc.sum().to_be_bytes(), png[pos + 8 + len..pos + 12 + len]);
            match kind {
                b"IHDR" => {
                    w = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
                    h = u32::from_be_bytes(data[4..8].try_into().unwrap()) as usize;
                }
                b"IDAT" => idat.extend_from_slice(data),
                _ => {}
            }
            pos += 12 + len;
        }
        let mut raw = Vec::new();
        flate2::read::ZlibDecoder::new(&idat[..]).read_to_end(&mut raw).unwrap();
        (w, h, raw)
    }

    #[test]
    fn charts_are_valid_pngs_with_ink() {
        for png in [
            confusion_matrix([[40, 10], [5, 45]], "confusion"),
            roc_curve(&[(0.0, 0.0), (0.1, 0.7), (1.0, 1.0)], 0.9, "ROC"),
            score_vs_param(
                &[("logreg".into(), vec![(1.0, 0.8), (10.0, 0.85), (100.0, 0.84)])],
                "C",
                "accuracy",
                "tune",
            ),
        ] {
            let (w, h, raw) = decode(&png);
            assert_eq!(raw.len(), (w * 3 + 1) * h);
            let dark = raw
                .chunks(w * 3 + 1)
                .flat_map(|r| r[1..].chunks(3))
                .filter(|p| p.iter().all(|&v| v < 100))
                .count();
            assert!(dark > 500, "{dark} dark pixels");
        }
    }
}
