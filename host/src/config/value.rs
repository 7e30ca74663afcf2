//! Config values and types, Python-literal parsing of override text, and coercion to a key's type.

use std::fmt;

/// One configuration value. Tuples of the reference (`(0.9, 0.999)`) are lists here.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
}

/// The declared type of a key.
#[derive(Clone, Debug, PartialEq)]
pub enum ValueType {
    Bool,
    Int,
    Float,
    Str,
    List(Box<ValueType>),
}

impl ValueType {
    /// Shorthand for `ValueType::List(Box::new(elem))`.
    pub fn list_of(elem: ValueType) -> ValueType {
        ValueType::List(Box::new(elem))
    }

    /// "an integer", "a list of numbers", ... for error messages.
    pub fn describe(&self) -> String {
        match self {
            ValueType::Bool => "a boolean (True or False)".to_string(),
            ValueType::Int => "an integer".to_string(),
            ValueType::Float => "a number".to_string(),
            ValueType::Str => "a string".to_string(),
            ValueType::List(elem) => format!("a list of {}", elem.plural()),
        }
    }

    fn plural(&self) -> String {
        match self {
            ValueType::Bool => "booleans".to_string(),
            ValueType::Int => "integers".to_string(),
            ValueType::Float => "numbers".to_string(),
            ValueType::Str => "strings".to_string(),
            ValueType::List(elem) => format!("lists of {}", elem.plural()),
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueType::Bool => f.write_str("bool"),
            ValueType::Int => f.write_str("int"),
            ValueType::Float => f.write_str("float"),
            ValueType::Str => f.write_str("str"),
            ValueType::List(elem) => write!(f, "list[{elem}]"),
        }
    }
}

impl Value {
    /// Parses text the way yacs decodes a value: a Python literal if it is one, else the text
    /// itself (surrounding whitespace removed). `None` is not a value here and comes back as
    /// the string `"None"`; the config builder refuses it with its own message.
    pub fn parse(text: &str) -> Value {
        match parse_literal(text) {
            Ok(value) => value,
            Err(_) => Value::Str(text.trim().to_string()),
        }
    }

    /// Converts to `ty`: exact matches, integers where numbers are expected (also inside
    /// lists). Everything else, including integral floats for integer keys, is `None`.
    pub fn coerce(&self, ty: &ValueType) -> Option<Value> {
        match (ty, self) {
            (ValueType::Bool, Value::Bool(_))
            | (ValueType::Int, Value::Int(_))
            | (ValueType::Float, Value::Float(_))
            | (ValueType::Str, Value::Str(_)) => Some(self.clone()),
            (ValueType::Float, Value::Int(i)) => Some(Value::Float(*i as f64)),
            (ValueType::List(elem), Value::List(items)) => items
                .iter()
                .map(|item| item.coerce(elem))
                .collect::<Option<Vec<_>>>()
                .map(Value::List),
            _ => None,
        }
    }

    /// Converts to JSON (non-finite floats become `null`, as JSON has no spelling for them).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::Float(x) => serde_json::Number::from_f64(*x)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Str(s) => serde_json::Value::String(s.clone()),
            Value::List(items) => {
                serde_json::Value::Array(items.iter().map(Value::to_json).collect())
            }
        }
    }
}

/// Python-style repr: `True`, `128`, `0.1`, `'cuda'`, `[80, 120]`.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(true) => f.write_str("True"),
            Value::Bool(false) => f.write_str("False"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x:?}"),
            Value::Str(s) => f.write_str(&python_quote(s)),
            Value::List(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// Quotes a string as a Python literal that [`Value::parse`] reads back unchanged.
pub(crate) fn python_quote(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Why text is not a literal value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NotLiteral {
    /// Not a Python literal at all (taken as a bare string).
    Syntax,
    /// A well-formed literal that contains `None`.
    ContainsNone,
}

/// Parses a Python literal (bools, ints, floats, quoted strings, lists, tuples, nested),
/// like `ast.literal_eval`, plus lowercase `true`/`false`. A top-level `1, 2` is a tuple,
/// as in Python.
pub(crate) fn parse_literal(text: &str) -> Result<Value, NotLiteral> {
    let mut parser = LiteralParser {
        chars: text.chars().collect(),
        pos: 0,
        saw_none: false,
    };
    let first = parser.value()?;
    parser.skip_ws();
    let value = if parser.eat(',') {
        let mut items = vec![first];
        parser.sequence_tail(None, &mut items)?;
        Value::List(items)
    } else {
        first
    };
    parser.skip_ws();
    if parser.pos != parser.chars.len() {
        return Err(NotLiteral::Syntax);
    }
    if parser.saw_none {
        return Err(NotLiteral::ContainsNone);
    }
    Ok(value)
}

struct LiteralParser {
    chars: Vec<char>,
    pos: usize,
    saw_none: bool,
}

impl LiteralParser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(c) if c.is_whitespace()) {
            self.pos += 1;
        }
    }

    fn value(&mut self) -> Result<Value, NotLiteral> {
        self.skip_ws();
        match self.peek().ok_or(NotLiteral::Syntax)? {
            '\'' | '"' => self.string(),
            '[' => {
                self.pos += 1;
                let mut items = Vec::new();
                self.sequence_tail(Some(']'), &mut items)?;
                Ok(Value::List(items))
            }
            '(' => self.parenthesized(),
            c if c.is_ascii_alphabetic() || c == '_' => self.keyword(),
            _ => self.number(),
        }
    }

    /// Parses `item, item, ...` up to `close` (or the end of input when `close` is `None`),
    /// allowing a trailing comma. For `None`, the first comma was already consumed.
    fn sequence_tail(
        &mut self,
        close: Option<char>,
        items: &mut Vec<Value>,
    ) -> Result<(), NotLiteral> {
        loop {
            self.skip_ws();
            match close {
                Some(c) if self.eat(c) => return Ok(()),
                None if self.peek().is_none() => return Ok(()),
                _ => {}
            }
            items.push(self.value()?);
            self.skip_ws();
            if self.eat(',') {
                continue;
            }
            return match close {
                Some(c) if self.eat(c) => Ok(()),
                None if self.peek().is_none() => Ok(()),
                _ => Err(NotLiteral::Syntax),
            };
        }
    }

    /// `()` and `(a, ...)` are tuples (lists here); `(a)` is just `a`.
    fn parenthesized(&mut self) -> Result<Value, NotLiteral> {
        self.pos += 1;
        self.skip_ws();
        if self.eat(')') {
            return Ok(Value::List(Vec::new()));
        }
        let first = self.value()?;
        self.skip_ws();
        if self.eat(')') {
            return Ok(first);
        }
        if !self.eat(',') {
            return Err(NotLiteral::Syntax);
        }
        let mut items = vec![first];
        self.sequence_tail(Some(')'), &mut items)?;
        Ok(Value::List(items))
    }

    fn keyword(&mut self) -> Result<Value, NotLiteral> {
        let start = self.pos;
        while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == '_') {
            self.pos += 1;
        }
        let word: String = self.chars[start..self.pos].iter().collect();
        match word.as_str() {
            "True" | "true" => Ok(Value::Bool(true)),
            "False" | "false" => Ok(Value::Bool(false)),
            "None" => {
                self.saw_none = true;
                // A placeholder so parsing can go on; the whole literal is refused at the end.
                Ok(Value::Bool(false))
            }
            _ => Err(NotLiteral::Syntax),
        }
    }

    fn string(&mut self) -> Result<Value, NotLiteral> {
        let quote = self.peek().ok_or(NotLiteral::Syntax)?;
        self.pos += 1;
        let mut out = String::new();
        loop {
            let c = self.peek().ok_or(NotLiteral::Syntax)?;
            self.pos += 1;
            match c {
                c if c == quote => return Ok(Value::Str(out)),
                '\n' => return Err(NotLiteral::Syntax),
                '\\' => {
                    let escaped = self.peek().ok_or(NotLiteral::Syntax)?;
                    self.pos += 1;
                    match escaped {
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => out.push('\r'),
                        '0' => out.push('\0'),
                        '\\' | '\'' | '"' => out.push(escaped),
                        // Python keeps unknown escapes as written.
                        other => {
                            out.push('\\');
                            out.push(other);
                        }
                    }
                }
                c => out.push(c),
            }
        }
    }

    /// `[+-]* digits [. digits] [e [+-] digits]`, with `1.` and `.5` allowed as in Python.
    fn number(&mut self) -> Result<Value, NotLiteral> {
        let mut negative = false;
        loop {
            self.skip_ws();
            if self.eat('-') {
                negative = !negative;
            } else if !self.eat('+') {
                break;
            }
        }
        let start = self.pos;
        let digits = |p: &mut Self| {
            let from = p.pos;
            while matches!(p.peek(), Some(c) if c.is_ascii_digit()) {
                p.pos += 1;
            }
            p.pos - from
        };
        let int_digits = digits(self);
        let mut is_float = false;
        let mut frac_digits = 0;
        if self.eat('.') {
            is_float = true;
            frac_digits = digits(self);
        }
        if int_digits == 0 && frac_digits == 0 {
            return Err(NotLiteral::Syntax);
        }
        if matches!(self.peek(), Some('e' | 'E')) {
            self.pos += 1;
            if !self.eat('+') {
                self.eat('-');
            }
            if digits(self) == 0 {
                return Err(NotLiteral::Syntax);
            }
            is_float = true;
        }
        // `1.5x` or `12abc` is not a number followed by something: it is not a literal.
        if matches!(self.peek(), Some(c) if c.is_alphanumeric() || c == '_' || c == '.') {
            return Err(NotLiteral::Syntax);
        }
        let body: String = self.chars[start..self.pos].iter().collect();
        let text = if negative { format!("-{body}") } else { body };
        if is_float {
            text.parse::<f64>()
                .map(Value::Float)
                .map_err(|_| NotLiteral::Syntax)
        } else {
            text.parse::<i64>()
                .map(Value::Int)
                .map_err(|_| NotLiteral::Syntax)
        }
    }
}
