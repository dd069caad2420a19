//! Integers read from JSON exactly.
//!
//! arrow-json reads a number with a fraction into an integer column by
//! truncating it: `1.5` becomes `1`, a value changed without a word. So JSON
//! is decoded with integer fields (at any depth) read as their text, which the
//! decoder's `coerce_primitive` keeps as written, and the text is parsed here.
//! A whole number in the column's range fits (`12`, `-3`, `5.0`, `1e3`); any
//! other value (`1.5`, `1e-1`, `"ten"`, `true`) does not, as a value of the
//! wrong type does not.
//!
//! `coerce_primitive` also makes a number or a boolean in a STRING column its
//! text (`12345` gives `"12345"`), as Spark's JSON reader does. Map keys stay
//! as they are: JSON writes them as strings, which arrow parses strictly.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, ArrowPrimitiveType, AsArray, GenericListArray, MapArray, OffsetSizeTrait, PrimitiveArray,
    RecordBatch, StructArray,
};
use arrow::datatypes::{
    DataType, Field, FieldRef, Fields, Int8Type, Int16Type, Int32Type, Int64Type, Schema, SchemaRef, UInt8Type,
    UInt16Type, UInt32Type, UInt64Type,
};
use arrow::error::ArrowError;

/// A value that is not a whole number of its column's type.
#[derive(Debug, Clone, PartialEq)]
pub struct Misfit {
    /// The row (at the level of the array it was found in).
    pub row: usize,
    /// The field, `parent.child` inside structs.
    pub field: String,
    pub text: String,
    pub data_type: DataType,
}

impl Misfit {
    /// The error a strict decoder gives for it.
    pub fn error(&self) -> ArrowError {
        ArrowError::JsonError(format!(
            "whilst decoding field '{}': {} is not a whole number that fits {}",
            self.field, self.text, self.data_type
        ))
    }
}

/// The schema JSON is decoded with to get `schema`: integer fields as text.
/// `schema` itself when it has no integer field.
pub fn read_schema(schema: &SchemaRef) -> SchemaRef {
    if !schema.fields().iter().any(|f| has_ints(f.data_type())) {
        return schema.clone();
    }
    let fields: Vec<FieldRef> = schema.fields().iter().map(read_field).collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// `batch`, decoded with [`read_schema`]`(schema)`, with `schema`'s types;
/// or the rows holding a value that does not fit, with the first such value.
pub fn convert(batch: RecordBatch, schema: &SchemaRef) -> Result<Result<RecordBatch, Vec<Misfit>>, ArrowError> {
    if Arc::ptr_eq(&batch.schema(), schema) || batch.schema().fields() == schema.fields() {
        return Ok(Ok(batch.with_schema(schema.clone())?));
    }
    let mut columns = Vec::with_capacity(batch.num_columns());
    let mut misfits = Vec::new();
    for (column, field) in batch.columns().iter().zip(schema.fields()) {
        match exact(column, field)? {
            Ok(column) => columns.push(column),
            Err(found) => misfits.extend(found),
        }
    }
    if !misfits.is_empty() {
        return Ok(Err(misfits));
    }
    Ok(Ok(RecordBatch::try_new(schema.clone(), columns)?))
}

/// [`convert`] for a strict decoder: a value that does not fit is an error.
pub fn convert_strictly(batch: RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    convert(batch, schema)?.map_err(|misfits| misfits[0].error())
}

fn is_int(data_type: &DataType) -> bool {
    data_type.is_integer()
}

fn has_ints(data_type: &DataType) -> bool {
    match data_type {
        t if is_int(t) => true,
        DataType::Struct(fields) => fields.iter().any(|f| has_ints(f.data_type())),
        DataType::List(item) | DataType::LargeList(item) => has_ints(item.data_type()),
        DataType::Map(entries, _) => map_value(entries).is_some_and(|value| has_ints(value.data_type())),
        _ => false,
    }
}

fn map_value(entries: &Field) -> Option<&FieldRef> {
    match entries.data_type() {
        DataType::Struct(fields) => fields.get(1),
        _ => None,
    }
}

fn read_field(field: &FieldRef) -> FieldRef {
    if !has_ints(field.data_type()) {
        return field.clone();
    }
    let data_type = match field.data_type() {
        t if is_int(t) => DataType::Utf8,
        DataType::Struct(fields) => DataType::Struct(fields.iter().map(read_field).collect()),
        DataType::List(item) => DataType::List(read_field(item)),
        DataType::LargeList(item) => DataType::LargeList(read_field(item)),
        DataType::Map(entries, sorted) => {
            let DataType::Struct(pair) = entries.data_type() else { unreachable!("has_ints checked a map's entries") };
            let pair: Fields = vec![pair[0].clone(), read_field(&pair[1])].into();
            DataType::Map(Arc::new(entries.as_ref().clone().with_data_type(DataType::Struct(pair))), *sorted)
        }
        other => other.clone(),
    };
    Arc::new(field.as_ref().clone().with_data_type(data_type))
}

/// `array` as decoded for `field`, with `field`'s type; or where it does not fit.
fn exact(array: &ArrayRef, field: &Field) -> Result<Result<ArrayRef, Vec<Misfit>>, ArrowError> {
    if array.data_type() == field.data_type() {
        return Ok(Ok(array.clone()));
    }
    let found = match field.data_type() {
        DataType::Int8 => ints::<Int8Type>(array, field),
        DataType::Int16 => ints::<Int16Type>(array, field),
        DataType::Int32 => ints::<Int32Type>(array, field),
        DataType::Int64 => ints::<Int64Type>(array, field),
        DataType::UInt8 => ints::<UInt8Type>(array, field),
        DataType::UInt16 => ints::<UInt16Type>(array, field),
        DataType::UInt32 => ints::<UInt32Type>(array, field),
        DataType::UInt64 => ints::<UInt64Type>(array, field),
        DataType::Struct(fields) => structs(array.as_struct(), fields)?,
        DataType::List(item) => lists(array.as_list::<i32>(), item)?,
        DataType::LargeList(item) => lists(array.as_list::<i64>(), item)?,
        DataType::Map(entries, sorted) => {
            let map = array.as_map();
            let DataType::Struct(pair) = entries.data_type() else { unreachable!("a map's entries are a struct") };
            match structs(map.entries(), pair)? {
                Ok(pairs) => Ok(Arc::new(MapArray::try_new(
                    entries.clone(),
                    map.offsets().clone(),
                    pairs.as_struct().clone(),
                    map.nulls().cloned(),
                    *sorted,
                )?) as ArrayRef),
                Err(misfits) => Err(in_rows(misfits, map.offsets())),
            }
        }
        other => {
            return Err(ArrowError::SchemaError(format!("cannot read {other} exactly from {}", array.data_type())));
        }
    };
    let name = field.name();
    Ok(found.map_err(|misfits| {
        let path = |inner: String| if inner.is_empty() { name.clone() } else { format!("{name}.{inner}") };
        misfits.into_iter().map(|m| Misfit { field: path(m.field), ..m }).collect()
    }))
}

fn ints<T>(array: &ArrayRef, field: &Field) -> Result<ArrayRef, Vec<Misfit>>
where
    T: ArrowPrimitiveType,
    T::Native: TryFrom<i128> + Default,
{
    let texts = array.as_string::<i32>();
    let (offsets, bytes) = (texts.value_offsets(), texts.value_data());
    let mut values = Vec::with_capacity(texts.len());
    let mut misfits = Vec::new();
    for row in 0..texts.len() {
        let text = &bytes[offsets[row] as usize..offsets[row + 1] as usize];
        let value = match plain(text) {
            Some(value) => T::Native::try_from(i128::from(value)).ok(),
            None if texts.is_null(row) => Some(T::Native::default()),
            None => std::str::from_utf8(text).ok().and_then(whole).and_then(|value| T::Native::try_from(value).ok()),
        };
        match value {
            Some(value) => values.push(value),
            None => {
                values.push(T::Native::default());
                misfits.push(Misfit {
                    row,
                    field: String::new(),
                    text: String::from_utf8_lossy(text).into_owned(),
                    data_type: field.data_type().clone(),
                });
            }
        }
    }
    if !misfits.is_empty() {
        return Err(misfits);
    }
    let array =
        PrimitiveArray::<T>::new(values.into(), texts.nulls().cloned()).with_data_type(field.data_type().clone());
    Ok(Arc::new(array))
}

/// The value of at most 18 digits, with an optional `-`: what almost every
/// integer in JSON looks like, read without going through [`whole`].
#[inline]
fn plain(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, text),
    };
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut value: i64 = 0;
    for byte in digits {
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        value = value * 10 + i64::from(digit);
    }
    Some(if negative { -value } else { value })
}

fn structs(array: &StructArray, fields: &Fields) -> Result<Result<ArrayRef, Vec<Misfit>>, ArrowError> {
    let mut columns = Vec::with_capacity(fields.len());
    let mut misfits = Vec::new();
    for (column, field) in array.columns().iter().zip(fields) {
        match exact(column, field)? {
            Ok(column) => columns.push(column),
            Err(found) => misfits.extend(found),
        }
    }
    if !misfits.is_empty() {
        return Ok(Err(misfits));
    }
    Ok(Ok(Arc::new(StructArray::try_new(fields.clone(), columns, array.nulls().cloned())?)))
}

fn lists<O: OffsetSizeTrait>(
    array: &GenericListArray<O>,
    item: &FieldRef,
) -> Result<Result<ArrayRef, Vec<Misfit>>, ArrowError> {
    Ok(match exact(array.values(), item)? {
        Ok(values) => Ok(Arc::new(GenericListArray::<O>::try_new(
            item.clone(),
            array.offsets().clone(),
            values,
            array.nulls().cloned(),
        )?)),
        Err(misfits) => Err(in_rows(misfits, array.offsets())),
    })
}

/// Misfits found among a list's elements, numbered by the list's rows.
fn in_rows<O: OffsetSizeTrait>(misfits: Vec<Misfit>, offsets: &[O]) -> Vec<Misfit> {
    misfits
        .into_iter()
        .map(|m| {
            let row = offsets.partition_point(|o| o.as_usize() <= m.row).saturating_sub(1);
            Misfit { row, ..m }
        })
        .collect()
}

/// The whole number `text` writes (a JSON number, or a string holding one):
/// `12`, `-3`, `5.0`, `1e3`, `2.50E1`; `None` for `1.5`, `1e-1`, or not a number.
pub fn whole(text: &str) -> Option<i128> {
    if let Ok(value) = text.parse::<i64>() {
        return Some(i128::from(value));
    }
    let (negative, unsigned) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => (mantissa, exponent.parse::<i64>().ok()?),
        None => (unsigned, 0),
    };
    let (int, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = int.bytes().chain(fraction.bytes());
    if int.is_empty() && fraction.is_empty() || !digits.clone().all(|d| d.is_ascii_digit()) {
        return None;
    }
    // The digits, with the decimal point after the first `point` of them.
    let point = i64::try_from(int.len()).ok()?.checked_add(exponent)?;
    let mut value: i128 = 0;
    let mut written: i64 = 0;
    for digit in digits {
        let digit = i128::from(digit - b'0');
        if written < point {
            value = value.checked_mul(10)?.checked_add(digit)?;
        } else if digit != 0 {
            return None;
        }
        written += 1;
    }
    // Zeros the exponent adds after the written digits.
    if value != 0 {
        for _ in written..point {
            value = value.checked_mul(10)?;
        }
    }
    Some(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, Int64Array, ListArray, StringArray};

    #[test]
    fn whole_numbers_are_read_exactly_and_fractions_refused() {
        for (text, value) in [
            ("12", 12),
            ("-3", -3),
            ("+4", 4),
            ("5.0", 5),
            ("5.000", 5),
            ("1e3", 1000),
            ("2.50E1", 25),
            ("-1.5e1", -15),
            ("0.0", 0),
            ("0e999999", 0),
            ("9223372036854775807", i128::from(i64::MAX)),
            ("9223372036854775807.0", i128::from(i64::MAX)),
            ("18446744073709551615", i128::from(u64::MAX)),
        ] {
            assert_eq!(whole(text), Some(value), "{text}");
        }
        for text in
            ["1.5", "-0.5", "1e-1", "150e-2", "1.00000000000000000001", "ten", "", "-", ".", "1.2.3", "true", "1e"]
        {
            assert_eq!(whole(text), None, "{text}");
        }
        assert_eq!(whole("9007199254740993.0"), Some(9_007_199_254_740_993), "beyond f64's exact integers");
    }

    #[test]
    fn integer_fields_at_every_depth_are_read_as_text_and_converted_back() {
        let item = DataType::Struct(vec![Field::new("qty", DataType::Int32, true)].into());
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("items", DataType::List(Arc::new(Field::new("item", item, true))), true),
            Field::new("name", DataType::Utf8, true),
        ]));
        let read = read_schema(&schema);
        assert_eq!(read.field(0).data_type(), &DataType::Utf8);
        assert!(!has_ints(read.field(1).data_type()));
        let decode = |text: &str| {
            let mut decoder =
                arrow::json::ReaderBuilder::new(read.clone()).with_coerce_primitive(true).build_decoder().unwrap();
            decoder.decode(text.as_bytes()).unwrap();
            decoder.flush().unwrap().unwrap()
        };

        let good = decode("{\"id\": 1e2, \"items\": [{\"qty\": 2.0}, {\"qty\": null}], \"name\": 7}\n{\"id\": -5}\n");
        let batch = convert(good, &schema).unwrap().unwrap();
        assert_eq!(
            batch.column(0).as_any().downcast_ref::<Int64Array>().unwrap(),
            &Int64Array::from(vec![Some(100), Some(-5)])
        );
        let items = batch.column(1).as_any().downcast_ref::<ListArray>().unwrap();
        let qty = items.values().as_struct().column(0).as_any().downcast_ref::<Int32Array>().unwrap().clone();
        assert_eq!(qty, Int32Array::from(vec![Some(2), None]));
        assert_eq!(batch.column(2).as_any().downcast_ref::<StringArray>().unwrap().value(0), "7");

        let bad = decode(concat!(
            "{\"id\": 1}\n",
            "{\"id\": 2, \"items\": [{\"qty\": 1}, {\"qty\": 3000000000}]}\n",
            "{\"id\": 3.5}\n",
            "{\"id\": 4, \"items\": [{\"qty\": 1.5}]}\n",
        ));
        let misfits = convert(bad, &schema).unwrap().unwrap_err();
        let found: Vec<(usize, &str, &str)> =
            misfits.iter().map(|m| (m.row, m.field.as_str(), m.text.as_str())).collect();
        assert_eq!(found, vec![(2, "id", "3.5"), (1, "items.item.qty", "3000000000"), (3, "items.item.qty", "1.5")]);
        assert!(misfits[0].error().to_string().contains("3.5 is not a whole number that fits Int64"));
    }
}
