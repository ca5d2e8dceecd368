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

/// Why a condition (`when`) is refused; each message quotes it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConditionError {
    #[error("{text:?}: {source}")]
    Syntax {
        text: String,
        source: EvalexprError<DefaultNumericTypes>,
    },
    #[error("{text:?}: assignments are not allowed in a condition")]
    Assignment { text: String },
    #[error("{text:?}: incomplete expression ({source})")]
    Incomplete {
        text: String,
        source: EvalexprError<DefaultNumericTypes>,
    },
    /// What a trial run gave instead of true/false ("nothing" for the empty value).
    #[error("{text:?} gives {gives}, not true/false")]
    NotBoolean { text: String, gives: String },
    /// A constant condition fails when evaluated.
    #[error(transparent)]
    Constant(#[from] EvalError),
}

/// Why a condition could not be evaluated for a reading.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    #[error("field {name:?} is {type_name}, which a condition cannot use")]
    FieldType {
        name: String,
        type_name: &'static str,
    },
    #[error("the reading has no field {name:?}")]
    NoField { name: String },
    #[error("condition {text:?} gave {value}, not true/false")]
    NotBoolean {
        text: String,
        value: Value<DefaultNumericTypes>,
    },
    #[error("condition {text:?}: {source}")]
    Failed {
        text: String,
        source: EvalexprError<DefaultNumericTypes>,
    },
}

impl Condition {
    pub fn parse(text: &str, pattern: Option<&Pattern>) -> Result<Condition, ConditionError> {
        let tree = build_operator_tree::<DefaultNumericTypes>(text).map_err(|source| {
            ConditionError::Syntax {
                text: text.to_string(),
                source,
            }
        })?;
        if tree.iter_variable_identifiers().count() != tree.iter_read_variable_identifiers().count()
        {
            return Err(ConditionError::Assignment {
                text: text.to_string(),
            });
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
                    return Err(ConditionError::Incomplete {
                        text: text.to_string(),
                        source: e,
                    });
                }
                Ok(v) if !v.is_boolean() => {
                    return Err(ConditionError::NotBoolean {
                        text: text.to_string(),
                        gives: if v.is_empty() {
                            "nothing".to_string()
                        } else {
                            v.to_string()
                        },
                    });
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
    ) -> Result<bool, EvalError> {
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
                        return Err(EvalError::FieldType {
                            name: name.clone(),
                            type_name: other.type_name(),
                        })
                    }
                    None => return Err(EvalError::NoField { name: name.clone() }),
                },
            }
        }
        let ctx = Ctx {
            vars: &self.vars,
            values,
        };
        match self.tree.eval_with_context(&ctx) {
            Ok(Value::Boolean(b)) => Ok(b),
            Ok(other) => Err(EvalError::NotBoolean {
                text: self.text.clone(),
                value: other,
            }),
            Err(source) => Err(EvalError::Failed {
                text: self.text.clone(),
                source,
            }),
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

    /// The messages a rule's `last_error` shows (as they were when they were strings).
    #[test]
    fn evaluation_errors_say_what_went_wrong() {
        let mut s = Scratch::default();
        let c = Condition::parse("t > 20", None).unwrap();
        let msg = |payload| {
            c.eval(&r("x", payload), 0.0, &mut Scratch::default())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(msg(br#"{"u":1}"#), r#"the reading has no field "t""#);
        assert_eq!(
            msg(br#"{"t":[1]}"#),
            r#"field "t" is array/object, which a condition cannot use"#
        );
        assert_eq!(
            msg(br#"{"t":"hot"}"#),
            r#"condition "t > 20": Expected a Value::Float or Value::Int, but got String("hot")."#
        );
        let c = Condition::parse("if(t > 1, t, true)", None).unwrap();
        assert_eq!(
            c.eval(&r("x", br#"{"t":5}"#), 0.0, &mut s)
                .unwrap_err()
                .to_string(),
            r#"condition "if(t > 1, t, true)" gave 5, not true/false"#
        );
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
