//! `#[qmpgate_plugin_sdk::plugin]`, put on a plugin's `impl Plugin for T` block:
//! exports `T` as the component's hooks and tells the host which hooks `T`
//! implements (the methods the block defines), so the host never calls the others.
//!
//! Use it through `qmpgate-plugin-sdk`, which re-exports it. It reads the block's
//! tokens directly (no `syn`): all it needs is the type after `for` and the names
//! after `fn` at the block's top level.

use proc_macro::{Delimiter, Group, Ident, Punct, Spacing, Span, TokenStream, TokenTree};

/// The hooks of the `Plugin` trait; any other method in the block is not one.
const HOOKS: &[&str] = &[
    "on_connect",
    "on_command",
    "on_decision",
    "on_response",
    "on_event",
    "on_disconnect",
    "translate_hmp",
];

/// Exports the plugin implemented by this `impl Plugin for T` block. See the
/// crate's documentation.
#[proc_macro_attribute]
pub fn plugin(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return error("#[plugin] takes no arguments");
    }
    let tokens: Vec<TokenTree> = item.clone().into_iter().collect();
    let body = match tokens.last() {
        Some(TokenTree::Group(group)) if group.delimiter() == Delimiter::Brace => group,
        _ => return error("#[plugin] goes on an `impl Plugin for T { ... }` block"),
    };
    let is_ident =
        |t: &TokenTree, word: &str| matches!(t, TokenTree::Ident(i) if i.to_string() == word);
    let Some(after_for) = tokens
        .iter()
        .position(|t| is_ident(t, "for"))
        .map(|i| i + 1)
    else {
        return error("#[plugin] goes on an `impl Plugin for T { ... }` block");
    };
    let end = tokens[after_for..]
        .iter()
        .position(|t| is_ident(t, "where"))
        .map_or(tokens.len() - 1, |i| after_for + i);
    let ty: Vec<TokenTree> = tokens[after_for..end].to_vec();

    let body: Vec<TokenTree> = body.stream().into_iter().collect();
    // What the attribute cannot see through would leave a hook undeclared, and the
    // host would never call it (a policy that lets everything through): refused.
    for pair in body.windows(2) {
        match (&pair[0], &pair[1]) {
            (TokenTree::Ident(_), TokenTree::Punct(p)) if p.as_char() == '!' => {
                return error(
                    "#[plugin] cannot see the hooks a macro defines: write them out in the impl block",
                );
            }
            (first, TokenTree::Ident(name))
                if is_ident(first, "fn") && name.to_string().starts_with("r#") =>
            {
                return error("#[plugin]: write hook names without r#");
            }
            _ => {}
        }
    }
    let mut hooks: Vec<String> = body
        .windows(2)
        .filter(|pair| is_ident(&pair[0], "fn"))
        .filter_map(|pair| match &pair[1] {
            TokenTree::Ident(name) if HOOKS.contains(&name.to_string().as_str()) => {
                Some(name.to_string())
            }
            _ => None,
        })
        .collect();
    hooks.sort();

    // item, then `::qmpgate_plugin_sdk::__export_plugin!(T; hook, hook);`
    let mut arguments: Vec<TokenTree> = ty;
    arguments.push(Punct::new(';', Spacing::Alone).into());
    for (i, hook) in hooks.iter().enumerate() {
        if i > 0 {
            arguments.push(Punct::new(',', Spacing::Alone).into());
        }
        arguments.push(Ident::new(hook, Span::call_site()).into());
    }
    let mut out = item;
    out.extend(path(&["qmpgate_plugin_sdk", "__export_plugin"]));
    out.extend([
        TokenTree::from(Punct::new('!', Spacing::Alone)),
        Group::new(Delimiter::Parenthesis, arguments.into_iter().collect()).into(),
        Punct::new(';', Spacing::Alone).into(),
    ]);
    out
}

/// `::a::b` as tokens.
fn path(segments: &[&str]) -> Vec<TokenTree> {
    let mut out = Vec::new();
    for segment in segments {
        out.push(Punct::new(':', Spacing::Joint).into());
        out.push(Punct::new(':', Spacing::Alone).into());
        out.push(Ident::new(segment, Span::call_site()).into());
    }
    out
}

/// `compile_error!("message");`
fn error(message: &str) -> TokenStream {
    format!("compile_error!({message:?});")
        .parse()
        .expect("a valid token stream")
}
