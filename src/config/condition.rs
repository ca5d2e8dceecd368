//! `when` conditions: evalexpr expressions, parsed once at config load and evaluated against a
//! small per-rule context holding only the names the expression reads.
//!
//! Names: the payload's top-level fields (`value` for a plain number), the named levels of the
//! rule's `match`, `topic`, and `time` (Unix seconds, float). A field the reading lacks, or a
//! value of the wrong type, is an evaluation error: the rule is skipped for that reading and the
//! error counted.
//!
//! Layer: config (imports `core`): a `when` is compiled here, at load, so that `check-config`
//! reports it with its key and the rules stage only evaluates; it needs nothing of the stage.

use evalexpr::{
    build_operator_tree, Context, DefaultNumericTypes, EvalexprError, EvalexprResult, Node, Value,
};

use super::template::{level, Pattern};
use crate::core::decode::Field;
use crate::core::event::Reading;

#[derive(Debug, Clone)]
enum Source {
    Topic,
    Time,
    Level(usize),
    Field(String),
}

#[derive(Debug, Clone)]
struct Var {
    name: String,
    source: Source,
}

/// A compiled condition.
#[derive(Debug, Clone)]
pub struct Condition {
    text: String,
    tree: Node<DefaultNumericTypes>,
    vars: Vec<Var>,
}

impl PartialEq for Condition {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

/// Reusable values of one condition's variables (kept by the engine: strings keep their
/// capacity, so steady-state evaluation does not allocate for them).
#[derive(Debug, Default)]
pub struct Scratch(Vec<Value<DefaultNumericTypes>>);

struct Ctx<'a> {
    vars: &'a [Var],
    values: &'a [Value<DefaultNumericTypes>],
}

impl Context for Ctx<'_> {
    type NumericTypes = DefaultNumericTypes;
    fn get_value(&self, identifier: &str) -> Option<&Value<DefaultNumericTypes>> {
        self.vars
            .iter()
            .position(|v| v.name == identifier)
            .and_then(|i| self.values.get(i))
    }
    fn call_function(
        &self,
        identifier: &str,
        _argument: &Value<DefaultNumericTypes>,
    ) -> EvalexprResult<Value<DefaultNumericTypes>, DefaultNumericTypes> {
        Err(EvalexprError::FunctionIdentifierNotFound(
            identifier.to_string(),
        ))
    }
    fn are_builtin_functions_disabled(&self) -> bool {
        false
    }
    fn set_builtin_functions_disabled(
        &mut self,
        _disabled: bool,
    ) -> EvalexprResult<(), DefaultNumericTypes> {
        Err(EvalexprError::BuiltinFunctionsCannotBeDisabled)
    }
}

fn set_str(slot: &mut Value<DefaultNumericTypes>, s: &str) {
    if let Value::String(existing) = slot {
        existing.clear();
        existing.push_str(s);
    } else {
        *slot = Value::String(s.to_string());
    }
}

impl Condition {
    pub fn parse(text: &str, pattern: Option<&Pattern>) -> Result<Condition, String> {
        let tree = build_operator_tree::<DefaultNumericTypes>(text)
            .map_err(|e| format!("{text:?}: {e}"))?;
        if tree.iter_variable_identifiers().count() != tree.iter_read_variable_identifiers().count()
        {
            return Err(format!(
                "{text:?}: assignments are not allowed in a condition"
            ));
        }
        let mut vars: Vec<Var> = Vec::new();
        for name in tree.iter_read_variable_identifiers() {
            if vars.iter().any(|v| v.name == name) {
                continue;
            }
            let source = match (name, pattern.and_then(|p| p.level_of(name))) {
                (_, Some(l)) => Source::Level(l),
                ("topic", _) => Source::Topic,
                ("time", _) => Source::Time,
                (field, _) => Source::Field(field.to_string()),
            };
            vars.push(Var {
                name: name.to_string(),
                source,
            });
        }
        // An operand left out (`t > `) parses as the empty value: find it with a trial run in
        // which every name is a number.
        {
            let names: Vec<Var> = vars
                .iter()
                .map(|v| Var {
                    name: v.name.clone(),
                    source: Source::Time,
                })
                .collect();
            let values = vec![Value::Float(0.0); names.len()];
            let ctx = Ctx {
                vars: &names,
                values: &values,
            };
            match tree.eval_with_context(&ctx) {
                Err(e @ EvalexprError::WrongOperatorArgumentAmount { .. })
                | Err(e @ EvalexprError::WrongFunctionArgumentAmount { .. }) => {
                    return Err(format!("{text:?}: incomplete expression ({e})"));
                }
                Ok(v) if !v.is_boolean() => {
                    return Err(format!(
                        "{text:?} gives {}, not true/false",
                        if v.is_empty() {
                            "nothing".to_string()
                        } else {
                            v.to_string()
                        }
                    ));
                }
                _ => {}
            }
        }
        // Constant expressions can be checked completely now.
        if vars.is_empty() {
            let c = Condition {
                text: text.to_string(),
                tree: tree.clone(),
                vars: Vec::new(),
            };
            let mut s = Scratch::default();
            let dummy = Reading {
                topic: String::new(),
                received: std::time::SystemTime::UNIX_EPOCH,
                payload: crate::core::decode::Payload::Opaque(bytes::Bytes::new()),
                traceparent: None,
            };
            c.eval(&dummy, 0.0, &mut s)?;
        }
        Ok(Condition {
            text: text.to_string(),
            tree,
            vars,
        })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Evaluate for `reading` at `time` (Unix seconds).
    pub fn eval(
        &self,
        reading: &Reading,
        time: f64,
        scratch: &mut Scratch,
    ) -> Result<bool, String> {
        let values = &mut scratch.0;
        values.resize(self.vars.len(), Value::Empty);
        for (var, slot) in self.vars.iter().zip(values.iter_mut()) {
            match &var.source {
                Source::Topic => set_str(slot, &reading.topic),
                Source::Time => *slot = Value::Float(time),
                Source::Level(l) => set_str(slot, level(&reading.topic, *l)),
                Source::Field(name) => match reading.payload.field(name) {
                    Some(Field::Number(v)) => *slot = Value::Float(v),
                    Some(Field::Bool(b)) => *slot = Value::Boolean(b),
                    Some(Field::Str(s)) => set_str(slot, &s),
                    Some(other) => {
                        return Err(format!(
                            "field {name:?} is {}, which a condition cannot use",
                            other.type_name()
                        ))
                    }
                    None => return Err(format!("the reading has no field {name:?}")),
                },
            }
        }
        let ctx = Ctx {
            vars: &self.vars,
            values,
        };
        match self.tree.eval_with_context(&ctx) {
            Ok(Value::Boolean(b)) => Ok(b),
            Ok(other) => Err(format!(
                "condition {:?} gave {other}, not true/false",
                self.text
            )),
            Err(e) => Err(format!("condition {:?}: {e}", self.text)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::decode::Payload;
    use bytes::Bytes;

    fn r(topic: &str, payload: &'static [u8]) -> Reading {
        Reading {
            topic: topic.into(),
            received: std::time::SystemTime::UNIX_EPOCH,
            payload: Payload::decode(Bytes::from_static(payload)),
            traceparent: None,
        }
    }

    #[test]
    fn conditions() {
        let p = Pattern::parse("sensors/{device}/{metric}").unwrap();
        let c = Condition::parse("t > 20 && device == \"a\" && time >= 0", Some(&p)).unwrap();
        let mut s = Scratch::default();
        assert_eq!(
            c.eval(&r("sensors/a/x", br#"{"t":21}"#), 1.0, &mut s),
            Ok(true)
        );
        assert_eq!(
            c.eval(&r("sensors/b/x", br#"{"t":21}"#), 1.0, &mut s),
            Ok(false)
        );
        // Missing field and wrong type: errors, not panics.
        assert!(c
            .eval(&r("sensors/a/x", br#"{"u":21}"#), 1.0, &mut s)
            .is_err());
        assert!(c
            .eval(&r("sensors/a/x", br#"{"t":"hot"}"#), 1.0, &mut s)
            .is_err());
        assert!(c
            .eval(&r("sensors/a/x", b"opaque\xff"), 1.0, &mut s)
            .is_err());
        let v = Condition::parse("value * 2 >= 10", None).unwrap();
        assert_eq!(v.eval(&r("x", b"5"), 0.0, &mut s), Ok(true));
        assert!(Condition::parse("value + 1", None).is_err());
        // Known at load: syntax, assignments, constant type errors.
        assert!(Condition::parse("t > ", None).is_err());
        assert!(Condition::parse("t = 3", None).is_err());
        assert!(Condition::parse("1 + \"a\" > 3", None).is_err());
    }
}
