//! One spelling per enum value: the name used on the command line, in config files and in
//! `config.json` comes from one table, through [`named_enum!`](crate::named_enum).

/// An enum whose values have one name each (see [`named_enum!`](crate::named_enum)).
pub trait Named: Sized + Copy + 'static {
    /// What kind of value this is, for error messages (`"distance"`).
    const WHAT: &'static str;
    /// Every value with its name, in documentation order.
    fn table() -> &'static [(&'static str, Self)];
    /// Older spellings still accepted when parsing, each with its value; never written.
    fn aliases() -> &'static [(&'static str, Self)] {
        &[]
    }
    /// The names, in documentation order.
    fn names() -> Vec<&'static str> {
        Self::table().iter().map(|(n, _)| *n).collect()
    }
}

/// The value named `s`, or an error that lists the valid names.
pub fn parse_named<T: Named>(s: &str) -> crate::Result<T> {
    T::table()
        .iter()
        .chain(T::aliases())
        .find(|(n, _)| *n == s)
        .map(|(_, v)| *v)
        .ok_or_else(|| crate::Error::UnknownName {
            what: T::WHAT,
            given: s.to_string(),
            valid: T::names().join(", "),
        })
}

/// Gives a fieldless enum its names: `NAMES`, `name()`, [`Named`], `Display`, `FromStr` and
/// serde as those names.
///
/// ```
/// #[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// pub enum Colour { Red, Blue }
/// sgr_core::named_enum!(Colour, "colour", { "red" => Red, "blue" => Blue });
/// assert_eq!("blue".parse::<Colour>().unwrap(), Colour::Blue);
/// assert_eq!(Colour::Red.to_string(), "red");
/// assert!("green".parse::<Colour>().unwrap_err().to_string().contains("red, blue"));
/// ```
///
/// An optional `aliases { "old-name" => Variant }` block keeps older spellings parsing; values
/// are always written under their one name.
#[macro_export]
macro_rules! named_enum {
    ($ty:ident, $what:literal, { $($name:literal => $variant:ident),+ $(,)? }
        $(aliases { $($alias:literal => $avariant:ident),+ $(,)? })?) => {
        impl $ty {
            /// Every value with its name (command line, config files, `config.json`).
            pub const NAMES: &'static [(&'static str, $ty)] = &[$(($name, $ty::$variant)),+];

            /// The name of this value.
            pub fn name(&self) -> &'static str {
                match self {
                    $($ty::$variant => $name,)+
                }
            }
        }

        impl $crate::names::Named for $ty {
            const WHAT: &'static str = $what;
            fn table() -> &'static [(&'static str, Self)] {
                Self::NAMES
            }
            fn aliases() -> &'static [(&'static str, Self)] {
                &[$($(($alias, $ty::$avariant)),+)?]
            }
        }

        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl ::std::str::FromStr for $ty {
            type Err = $crate::Error;
            fn from_str(s: &str) -> ::std::result::Result<Self, Self::Err> {
                $crate::names::parse_named(s)
            }
        }

        impl $crate::__serde::Serialize for $ty {
            fn serialize<S: $crate::__serde::Serializer>(
                &self,
                s: S,
            ) -> ::std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> $crate::__serde::Deserialize<'de> for $ty {
            fn deserialize<D: $crate::__serde::Deserializer<'de>>(
                d: D,
            ) -> ::std::result::Result<Self, D::Error> {
                let s = <::std::string::String as $crate::__serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(<D::Error as $crate::__serde::de::Error>::custom)
            }
        }
    };
}
