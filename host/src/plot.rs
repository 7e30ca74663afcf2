//! A minimal line plot rendered to PNG (RGB canvas, 3x5 pixel font for tick labels, encoded
//! by the `png` crate), enough for `imgclf lr-schedule --plot` without a plotting library.

pub type Rgb = [u8; 3];
pub const BLACK: Rgb = [0, 0, 0];
pub const GREY: Rgb = [225, 225, 225];
pub const BLUE: Rgb = [31, 119, 180];

pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    pub fn new(width: usize, height: usize) -> Self {
        Canvas {
            width,
            height,
            pixels: vec![255; width * height * 3],
        }
    }

    pub fn pixel(&self, x: usize, y: usize) -> Rgb {
        let i = (y * self.width + x) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }

    pub fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = (y as usize * self.width + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Bresenham line, `thick` pixels wide (vertically).
    pub fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb, thick: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            for t in 0..thick {
                self.set(x, y + t - thick / 2, c);
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text in the 3x5 font at `scale`; `(x, y)` is the top-left corner. Unknown characters
    /// are blank.
    pub fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Rgb) {
        for (k, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits & (0b100 >> col) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                self.set(
                                    x + (k as i64 * 4 + col) * scale + dx,
                                    y + r as i64 * scale + dy,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Width in pixels of `s` drawn at `scale`.
    pub fn text_width(s: &str, scale: i64) -> i64 {
        (s.chars().count() as i64 * 4 - 1).max(0) * scale
    }

    /// The canvas as a PNG file (8-bit RGB).
    pub fn to_png(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        // Encoding a well-formed RGB buffer into a Vec cannot fail.
        let written = encoder
            .write_header()
            .and_then(|mut w| w.write_image_data(&self.pixels));
        debug_assert!(written.is_ok(), "{written:?}");
        out
    }
}

/// Rows of a 3x5 glyph, most significant of the 3 bits on the left. Capitals are drawn as
/// small letters.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_lowercase() {
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b111, 0b001, 0b111, 0b100, 0b111],
        '3' => [0b111, 0b001, 0b111, 0b001, 0b111],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b111, 0b001, 0b111],
        '6' => [0b111, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b010, 0b010, 0b010],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b111],
        '.' => [0, 0, 0, 0, 0b010],
        '-' => [0, 0, 0b111, 0, 0],
        'e' => [0, 0b111, 0b111, 0b100, 0b111],
        'p' => [0, 0b111, 0b101, 0b111, 0b100],
        'o' => [0, 0b111, 0b101, 0b101, 0b111],
        'c' => [0, 0b111, 0b100, 0b100, 0b111],
        'h' => [0b100, 0b100, 0b111, 0b101, 0b101],
        'l' => [0b110, 0b010, 0b010, 0b010, 0b111],
        'r' => [0, 0b111, 0b100, 0b100, 0b100],
        'a' => [0, 0b110, 0b011, 0b101, 0b111],
        'b' => [0b100, 0b100, 0b111, 0b101, 0b111],
        'd' => [0b001, 0b001, 0b111, 0b101, 0b111],
        'f' => [0b011, 0b100, 0b110, 0b100, 0b100],
        'g' => [0, 0b111, 0b100, 0b101, 0b111],
        'i' => [0b010, 0, 0b010, 0b010, 0b010],
        'j' => [0b001, 0, 0b001, 0b101, 0b111],
        'k' => [0b100, 0b101, 0b110, 0b101, 0b101],
        'm' => [0, 0b111, 0b111, 0b101, 0b101],
        'n' => [0, 0b110, 0b101, 0b101, 0b101],
        'q' => [0, 0b111, 0b101, 0b111, 0b001],
        's' => [0, 0b111, 0b110, 0b011, 0b111],
        't' => [0b010, 0b111, 0b010, 0b010, 0b011],
        'u' => [0, 0b101, 0b101, 0b101, 0b111],
        'v' => [0, 0b101, 0b101, 0b101, 0b010],
        'w' => [0, 0b101, 0b101, 0b111, 0b111],
        'x' => [0, 0b101, 0b010, 0b010, 0b101],
        'y' => [0, 0b101, 0b111, 0b001, 0b111],
        'z' => [0, 0b111, 0b011, 0b110, 0b111],
        '_' => [0, 0, 0, 0, 0b111],
        '@' => [0b111, 0b101, 0b111, 0b100, 0b111],
        ':' => [0, 0b010, 0, 0b010, 0],
        '/' => [0b001, 0b001, 0b010, 0b100, 0b100],
        '(' => [0b010, 0b100, 0b100, 0b100, 0b010],
        ')' => [0b010, 0b001, 0b001, 0b001, 0b010],
        ',' => [0, 0, 0, 0b010, 0b100],
        '+' => [0, 0b010, 0b111, 0b010, 0],
        '=' => [0, 0b111, 0, 0b111, 0],
        _ => [0; 5],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_decodes_to_the_drawn_pixels() {
        let mut c = Canvas::new(10, 4);
        c.line((0, 1), (9, 1), BLUE, 1);
        assert_eq!(c.pixel(5, 1), BLUE);
        assert_eq!(c.pixel(5, 3), [255, 255, 255]);
        let bytes = c.to_png();
        let mut reader = png::Decoder::new(std::io::Cursor::new(&bytes))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (10, 4));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(&buf[..info.buffer_size()], &c.pixels[..]);
    }
}
