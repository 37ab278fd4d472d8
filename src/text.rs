//! Text normalisation and tokenisation shared by training and prediction, so a review is seen
//! the same way in both.

use unicode_normalization::{is_nfkc_quick, IsNormalized, UnicodeNormalization};

/// Removes HTML tags (`<br />` included), unescapes entities, applies Unicode NFKC, collapses
/// whitespace and optionally lowercases. Idempotent: normalising twice changes nothing.
pub fn normalize(text: &str, lowercase: bool) -> String {
    // Each step runs only when the text can need it: most reviews are plain text.
    let mut s = if text.contains('<') {
        strip_tags(text)
    } else {
        text.to_string()
    };
    if s.contains('&') {
        let unescaped = html_escape::decode_html_entities(&s).into_owned();
        // Entities can produce new tags (`&lt;br&gt;`): strip once more.
        s = if unescaped.contains('<') {
            strip_tags(&unescaped)
        } else {
            unescaped
        };
    }
    if !s.is_ascii() && is_nfkc_quick(s.chars()) != IsNormalized::Yes {
        s = s.nfkc().collect();
    }
    if lowercase {
        s = s.to_lowercase();
    }
    collapse_whitespace(&s)
}

/// Replaces every `<…>` tag by a space. A `<` with no closing `>` is kept as text.
fn strip_tags(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('<') {
        out.push_str(&rest[..open]);
        let after = &rest[open..];
        match after.find('>') {
            // A tag starts with a letter, `/` or `!`; `a < b` is text.
            Some(close) if after[1..].starts_with(|c: char| c.is_ascii_alphabetic() || c == '/' || c == '!') => {
                out.push(' ');
                rest = &after[close + 1..];
            }
            _ => {
                out.push('<');
                rest = &after[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn collapse_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// How documents are split into tokens.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    /// Runs of two or more word characters (letters, digits, `_`): scikit-learn's default
    /// `(?u)\b\w\w+\b`, without a regex engine.
    Words,
    /// Words with the apostrophes inside them, and each other character that is not a space:
    /// [`WORDS_AND_MARKS`]. ASCII text, most reviews, is scanned without the regex, which took
    /// a seventh of the server's CPU time per prediction; other text goes to it.
    WordsAndMarks(regex::Regex),
    /// Every match of a regular expression.
    Pattern(regex::Regex),
}

pub const DEFAULT_TOKEN_PATTERN: &str = r"(?u)\b\w\w+\b";

/// The token pattern of `pipelines/imdb.yaml`.
pub const WORDS_AND_MARKS: &str = r"(?u)\w+(?:'\w+)*|[^\w\s]";

/// Whether `c` belongs in a token of the default pattern: a letter, a digit (Unicode's
/// Alphabetic and Numeric) or `_`.
pub fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

impl Tokenizer {
    pub fn new(pattern: &str) -> Result<Tokenizer, regex::Error> {
        match pattern {
            DEFAULT_TOKEN_PATTERN => Ok(Tokenizer::Words),
            WORDS_AND_MARKS => regex::Regex::new(pattern).map(Tokenizer::WordsAndMarks),
            _ => regex::Regex::new(pattern).map(Tokenizer::Pattern),
        }
    }

    pub fn tokens<'a>(&self, text: &'a str, out: &mut Vec<&'a str>) {
        out.clear();
        match self {
            Tokenizer::Words => {
                let mut start = None;
                let mut chars = 0;
                for (i, c) in text.char_indices() {
                    if is_word_char(c) {
                        if start.is_none() {
                            start = Some(i);
                            chars = 0;
                        }
                        chars += 1;
                    } else if let Some(s) = start.take() {
                        if chars >= 2 {
                            out.push(&text[s..i]);
                        }
                    }
                }
                if let Some(s) = start {
                    if chars >= 2 {
                        out.push(&text[s..]);
                    }
                }
            }
            Tokenizer::WordsAndMarks(_) if text.is_ascii() => words_and_marks_ascii(text, out),
            Tokenizer::WordsAndMarks(re) | Tokenizer::Pattern(re) => out.extend(re.find_iter(text).map(|m| m.as_str())),
        }
    }
}

/// [`WORDS_AND_MARKS`] over ASCII text, where `\w` is `[0-9A-Za-z_]` and `\s` is
/// `[\t\n\x0B\x0C\r ]`.
fn words_and_marks_ascii<'a>(text: &'a str, out: &mut Vec<&'a str>) {
    let b = text.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < b.len() {
        let start = i;
        if word(b[i]) {
            loop {
                while i < b.len() && word(b[i]) {
                    i += 1;
                }
                if i + 1 < b.len() && b[i] == b'\'' && word(b[i + 1]) {
                    i += 1;
                } else {
                    break;
                }
            }
            out.push(&text[start..i]);
        } else {
            i += 1;
            if !(b[start].is_ascii_whitespace() || b[start] == 0x0B) {
                out.push(&text[start..i]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_html_entities_unicode_and_space() {
        let raw = "Great<br /><br />film &amp; cast &lt;3  \u{FB01}ne\tend";
        assert_eq!(normalize(raw, false), "Great film & cast <3 fine end");
        assert_eq!(normalize(raw, true), "great film & cast <3 fine end");
        let once = normalize(raw, true);
        assert_eq!(normalize(&once, true), once);
        assert_eq!(normalize("a < b and c > d", false), "a < b and c > d");
    }

    #[test]
    fn word_tokens_match_the_default_pattern() {
        let text = "it's a 10/10 film, naïve_fun x";
        let mut fast = Vec::new();
        Tokenizer::Words.tokens(text, &mut fast);
        let re = Tokenizer::Pattern(regex::Regex::new(DEFAULT_TOKEN_PATTERN).unwrap());
        let mut slow = Vec::new();
        re.tokens(text, &mut slow);
        assert_eq!(fast, slow);
        assert_eq!(fast, vec!["it", "10", "10", "film", "naïve_fun"]);
    }

    #[test]
    fn words_and_marks_match_their_pattern_on_ascii_and_leave_the_rest_to_it() {
        let fast = Tokenizer::new(WORDS_AND_MARKS).unwrap();
        assert!(matches!(fast, Tokenizer::WordsAndMarks(_)));
        let slow = Tokenizer::Pattern(regex::Regex::new(WORDS_AND_MARKS).unwrap());
        let tokens = |t: &Tokenizer, text: &str| {
            let mut out = Vec::new();
            t.tokens(text, &mut out);
            out.into_iter().map(str::to_string).collect::<Vec<_>>()
        };
        let mut texts: Vec<String> = [
            "it's rock'n'roll, isn't it? 10/10 -- 'tis the dogs' x''y _a_ b'_ c'",
            "\x0b\x0c\t\r\n end'",
            "naïve café's über-cool ½ ²",
            "",
        ]
        .map(str::to_string)
        .to_vec();
        // Every short string over an alphabet of each kind of character the pattern tells apart.
        let alphabet = ['a', '9', '_', '\'', ' ', '\x0b', '!', '-'];
        let mut seed = 7u64;
        for _ in 0..20_000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let len = (seed >> 60) as usize;
            texts.push((0..len).map(|k| alphabet[((seed >> (4 * k)) & 7) as usize]).collect());
        }
        for text in &texts {
            assert_eq!(tokens(&fast, text), tokens(&slow, text), "{text:?}");
        }
        assert_eq!(
            tokens(&fast, "don't stop'n go!"),
            ["don't", "stop'n", "go", "!"].map(str::to_string)
        );
    }
}
