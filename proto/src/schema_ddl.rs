//! Schemas written in SQL DDL style, as Spark and Auto Loader users write them:
//! `InvoiceNumber STRING, Items ARRAY<STRUCT<ItemCode STRING, Qty BIGINT>>`.
//!
//! Field names and types may be separated by a space or a colon (`a:INT`), type
//! names are case-insensitive, and `NOT NULL` marks a required field. The result
//! is an Arrow schema whose types map one to one onto Delta types.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, Schema, TimeUnit};

/// A schema string that could not be parsed; `position` counts characters from 0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at character {position}: {message}")]
pub struct DdlError {
    pub position: usize,
    pub message: String,
}

/// The type names this parser accepts, for error messages and docs.
pub const SUPPORTED_TYPES: &str = "STRING, BIGINT (LONG), INT (INTEGER), SMALLINT, TINYINT, \
     DOUBLE, FLOAT (REAL), BOOLEAN, DATE, TIMESTAMP, TIMESTAMP_NTZ, BINARY, DECIMAL(p,s), \
     ARRAY<type>, STRUCT<name type, ...>, MAP<key, value>";

/// A schema written back in the DDL this module parses (`a BIGINT, b STRING`),
/// for status output. Types without a DDL name are written as Arrow names them.
pub fn to_ddl(schema: &Schema) -> String {
    fields_ddl(schema.fields())
}

fn fields_ddl(fields: &Fields) -> String {
    let field = |f: &Arc<Field>| {
        let name = if f.name().chars().all(|c| c.is_alphanumeric() || c == '_') && !f.name().is_empty() {
            f.name().clone()
        } else {
            format!("`{}`", f.name().replace('`', "``"))
        };
        let required = if f.is_nullable() { "" } else { " NOT NULL" };
        format!("{name} {}{required}", type_ddl(f.data_type()))
    };
    fields.iter().map(field).collect::<Vec<_>>().join(", ")
}

fn type_ddl(data_type: &DataType) -> String {
    match data_type {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "STRING".to_string(),
        DataType::Int64 => "BIGINT".to_string(),
        DataType::Int32 => "INT".to_string(),
        DataType::Int16 => "SMALLINT".to_string(),
        DataType::Int8 => "TINYINT".to_string(),
        DataType::Float64 => "DOUBLE".to_string(),
        DataType::Float32 => "FLOAT".to_string(),
        DataType::Boolean => "BOOLEAN".to_string(),
        DataType::Date32 => "DATE".to_string(),
        DataType::Timestamp(_, Some(_)) => "TIMESTAMP".to_string(),
        DataType::Timestamp(_, None) => "TIMESTAMP_NTZ".to_string(),
        DataType::Binary | DataType::LargeBinary => "BINARY".to_string(),
        DataType::Decimal128(p, s) => format!("DECIMAL({p},{s})"),
        DataType::List(f) | DataType::LargeList(f) => format!("ARRAY<{}>", type_ddl(f.data_type())),
        DataType::Struct(fields) => format!("STRUCT<{}>", fields_ddl(fields)),
        DataType::Map(entries, _) => match entries.data_type() {
            DataType::Struct(kv) if kv.len() == 2 => {
                format!("MAP<{}, {}>", type_ddl(kv[0].data_type()), type_ddl(kv[1].data_type()))
            }
            other => other.to_string(),
        },
        other => other.to_string(),
    }
}

/// Parses a whole schema: a comma-separated list of fields.
pub fn parse_schema(ddl: &str) -> Result<Schema, DdlError> {
    let mut parser = Parser::new(ddl);
    let fields = parser.field_list(None)?;
    parser.skip_whitespace();
    if let Some(token) = parser.peek_char() {
        return Err(parser.error(format!("unexpected `{token}` after the last field")));
    }
    if fields.is_empty() {
        return Err(parser.error("the schema has no fields".to_string()));
    }
    Ok(Schema::new(fields))
}

struct Parser<'a> {
    chars: Vec<char>,
    position: usize,
    _source: &'a str,
}

impl<'a> Parser<'a> {
    fn new(source: &'a str) -> Self {
        Self { chars: source.chars().collect(), position: 0, _source: source }
    }

    fn error(&self, message: String) -> DdlError {
        DdlError { position: self.position, message }
    }

    fn skip_whitespace(&mut self) {
        while self.peek_char().is_some_and(char::is_whitespace) {
            self.position += 1;
        }
    }

    fn peek_char(&self) -> Option<char> {
        self.chars.get(self.position).copied()
    }

    fn eat(&mut self, expected: char) -> bool {
        self.skip_whitespace();
        if self.peek_char() == Some(expected) {
            self.position += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, expected: char) -> Result<(), DdlError> {
        if self.eat(expected) {
            return Ok(());
        }
        let found = self.peek_char().map_or("the end".to_string(), |c| format!("`{c}`"));
        Err(self.error(format!("expected `{expected}`, found {found}")))
    }

    /// An identifier, or a back-quoted name that may hold any character.
    fn name(&mut self) -> Result<String, DdlError> {
        self.skip_whitespace();
        if self.eat('`') {
            let start = self.position;
            while self.peek_char().is_some_and(|c| c != '`') {
                self.position += 1;
            }
            let name: String = self.chars[start..self.position].iter().collect();
            self.expect('`')?;
            return Ok(name);
        }
        let start = self.position;
        while self.peek_char().is_some_and(|c| c.is_alphanumeric() || c == '_') {
            self.position += 1;
        }
        if start == self.position {
            let found = self.peek_char().map_or("the end".to_string(), |c| format!("`{c}`"));
            return Err(self.error(format!("expected a field name, found {found}")));
        }
        Ok(self.chars[start..self.position].iter().collect())
    }

    /// Fields up to `closing` (or the end of input when `None`).
    fn field_list(&mut self, closing: Option<char>) -> Result<Vec<Field>, DdlError> {
        let mut fields: Vec<Field> = Vec::new();
        loop {
            self.skip_whitespace();
            if self.peek_char().is_none() || self.peek_char() == closing {
                return Ok(fields);
            }
            let field = self.field()?;
            if fields.iter().any(|f| f.name().eq_ignore_ascii_case(field.name())) {
                return Err(self.error(format!("field `{}` is declared twice", field.name())));
            }
            fields.push(field);
            if !self.eat(',') {
                return Ok(fields);
            }
        }
    }

    fn field(&mut self) -> Result<Field, DdlError> {
        let name = self.name()?;
        self.eat(':');
        self.skip_whitespace();
        if matches!(self.peek_char(), None | Some(',' | '>')) {
            return Err(self.error(format!("field `{name}` needs a type ({SUPPORTED_TYPES})")));
        }
        let data_type = self.data_type()?;
        let nullable = !self.keywords(&["NOT", "NULL"]);
        if self.keywords(&["COMMENT"]) {
            self.quoted_string()?;
        }
        Ok(Field::new(name, data_type, nullable))
    }

    /// Consumes the keywords if they all follow, case-insensitively.
    fn keywords(&mut self, words: &[&str]) -> bool {
        let saved = self.position;
        for word in words {
            self.skip_whitespace();
            let start = self.position;
            while self.peek_char().is_some_and(|c| c.is_alphanumeric() || c == '_') {
                self.position += 1;
            }
            let found: String = self.chars[start..self.position].iter().collect();
            if !found.eq_ignore_ascii_case(word) {
                self.position = saved;
                return false;
            }
        }
        true
    }

    fn quoted_string(&mut self) -> Result<String, DdlError> {
        self.skip_whitespace();
        let quote = match self.peek_char() {
            Some(q @ ('\'' | '"')) => q,
            _ => return Err(self.error("expected a quoted comment".to_string())),
        };
        self.position += 1;
        let start = self.position;
        while self.peek_char().is_some_and(|c| c != quote) {
            self.position += 1;
        }
        let text = self.chars[start..self.position].iter().collect();
        self.expect(quote)?;
        Ok(text)
    }

    fn integer(&mut self) -> Result<u32, DdlError> {
        self.skip_whitespace();
        let start = self.position;
        while self.peek_char().is_some_and(|c| c.is_ascii_digit()) {
            self.position += 1;
        }
        let digits: String = self.chars[start..self.position].iter().collect();
        digits.parse().map_err(|_| self.error("expected a number".to_string()))
    }

    fn data_type(&mut self) -> Result<DataType, DdlError> {
        let start = self.position;
        let type_name = self.name()?.to_ascii_uppercase();
        let data_type = match type_name.as_str() {
            "STRING" | "VARCHAR" | "CHAR" | "TEXT" => {
                if self.eat('(') {
                    self.integer()?;
                    self.expect(')')?;
                }
                DataType::Utf8
            }
            "BIGINT" | "LONG" => DataType::Int64,
            "INT" | "INTEGER" => DataType::Int32,
            "SMALLINT" | "SHORT" => DataType::Int16,
            "TINYINT" | "BYTE" => DataType::Int8,
            "DOUBLE" => DataType::Float64,
            "FLOAT" | "REAL" => DataType::Float32,
            "BOOLEAN" | "BOOL" => DataType::Boolean,
            "DATE" => DataType::Date32,
            "TIMESTAMP" => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            "TIMESTAMP_NTZ" => DataType::Timestamp(TimeUnit::Microsecond, None),
            "BINARY" => DataType::Binary,
            "DECIMAL" | "NUMERIC" => self.decimal()?,
            "ARRAY" => {
                self.expect('<')?;
                let element = self.data_type()?;
                self.expect('>')?;
                DataType::List(Arc::new(Field::new("element", element, true)))
            }
            "STRUCT" => {
                self.expect('<')?;
                let fields = self.field_list(Some('>'))?;
                self.expect('>')?;
                DataType::Struct(Fields::from(fields))
            }
            "MAP" => self.map()?,
            _ => {
                self.position = start;
                self.skip_whitespace();
                return Err(self.error(format!("unknown type `{type_name}`; supported types: {SUPPORTED_TYPES}")));
            }
        };
        Ok(data_type)
    }

    fn decimal(&mut self) -> Result<DataType, DdlError> {
        let (mut precision, mut scale) = (10, 0);
        if self.eat('(') {
            precision = self.integer()?;
            if self.eat(',') {
                scale = self.integer()?;
            }
            self.expect(')')?;
        }
        if !(1..=38).contains(&precision) || scale > precision {
            return Err(self.error(format!(
                "DECIMAL({precision},{scale}) is out of range: precision 1 to 38, scale at most the precision"
            )));
        }
        // Both fit: precision is at most 38 and scale at most precision.
        Ok(DataType::Decimal128(precision as u8, scale as i8))
    }

    fn map(&mut self) -> Result<DataType, DdlError> {
        self.expect('<')?;
        let key = self.data_type()?;
        self.expect(',')?;
        let value = self.data_type()?;
        self.expect('>')?;
        let entries = Fields::from(vec![Field::new("key", key, false), Field::new("value", value, true)]);
        Ok(DataType::Map(Arc::new(Field::new("key_value", DataType::Struct(entries), false)), false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_schemas_parse_back() {
        let ddl = "a BIGINT, `b c` STRING NOT NULL, d ARRAY<STRUCT<e DOUBLE, f MAP<STRING, INT>>>, g DECIMAL(10,2), h TIMESTAMP";
        let schema = parse_schema(ddl).unwrap();
        assert_eq!(parse_schema(&to_ddl(&schema)).unwrap(), schema);
        assert!(
            to_ddl(&schema).starts_with("a BIGINT, `b c` STRING NOT NULL, d ARRAY<STRUCT<e DOUBLE"),
            "{}",
            to_ddl(&schema)
        );
    }

    #[test]
    fn parses_the_retail_invoice_schema() {
        let ddl = "InvoiceNumber string, CreatedTime bigint, StoreID string, PosID string, \
            CashierID string, CustomerType string, CustomerCardNo string, TotalAmount double, \
            NumberOfItems bigint, PaymentMethod string, TaxableAmount double, CGST double, \
            SGST double, CESS double, DeliveryType string, \
            DeliveryAddress struct<AddressLine string, City string, ContactNumber string, PinCode string, State string>, \
            InvoiceLineItems array<struct<ItemCode string, ItemDescription string, ItemPrice double, ItemQty bigint, TotalValue double>>";
        let schema = parse_schema(ddl).unwrap();
        assert_eq!(schema.fields().len(), 17);
        let address = schema.field_with_name("DeliveryAddress").unwrap();
        let DataType::Struct(fields) = address.data_type() else { panic!("not a struct") };
        assert_eq!(fields.len(), 5);
        let items = schema.field_with_name("InvoiceLineItems").unwrap();
        let DataType::List(element) = items.data_type() else { panic!("not a list") };
        let DataType::Struct(item_fields) = element.data_type() else { panic!("not a struct") };
        assert_eq!(item_fields[3].data_type(), &DataType::Int64);
    }

    #[test]
    fn accepts_colons_not_null_decimals_and_maps() {
        let schema = parse_schema("a:INT NOT NULL, b DECIMAL(12, 2), c MAP<STRING, BIGINT>, `odd name` DATE").unwrap();
        assert!(!schema.field(0).is_nullable());
        assert_eq!(schema.field(1).data_type(), &DataType::Decimal128(12, 2));
        assert!(matches!(schema.field(2).data_type(), DataType::Map(..)));
        assert_eq!(schema.field(3).name(), "odd name");
    }

    #[test]
    fn errors_name_the_problem_and_the_place() {
        let err = parse_schema("a STRING, b STRUCT<c, d INT>").unwrap_err();
        assert!(err.message.contains("field `c` needs a type"), "{err}");
        let err = parse_schema("a STRNG").unwrap_err();
        assert!(err.message.contains("unknown type `STRNG`"), "{err}");
        assert_eq!(err.position, 2);
        let err = parse_schema("a ARRAY<INT").unwrap_err();
        assert!(err.message.contains("expected `>`"), "{err}");
        let err = parse_schema("a INT, A STRING").unwrap_err();
        assert!(err.message.contains("declared twice"), "{err}");
    }
}
