//! A file's language from its name: the word the prompt uses (`{language}`) and the tag of its
//! fenced code block.

/// (language name, fence tag) for a path; unknown extensions are plain text.
pub fn of(path: &str) -> (&'static str, &'static str) {
    let name = path.rsplit('/').next().unwrap_or(path);
    match name {
        "Dockerfile" => return ("Dockerfile", "dockerfile"),
        "Makefile" | "GNUmakefile" => return ("Makefile", "makefile"),
        "CMakeLists.txt" => return ("CMake", "cmake"),
        _ => {}
    }
    let ext = name
        .rsplit_once('.')
        .map_or("", |(_, e)| e)
        .to_ascii_lowercase();
    match ext.as_str() {
        "py" | "pyi" => ("Python", "python"),
        "rs" => ("Rust", "rust"),
        "go" => ("Go", "go"),
        "java" => ("Java", "java"),
        "kt" | "kts" => ("Kotlin", "kotlin"),
        "scala" => ("Scala", "scala"),
        "js" | "mjs" | "cjs" => ("JavaScript", "javascript"),
        "jsx" => ("JavaScript (JSX)", "jsx"),
        "ts" | "mts" | "cts" => ("TypeScript", "typescript"),
        "tsx" => ("TypeScript (TSX)", "tsx"),
        "c" => ("C", "c"),
        "h" => ("C header", "c"),
        "cc" | "cpp" | "cxx" | "hpp" | "hh" | "hxx" => ("C++", "cpp"),
        "cs" => ("C#", "csharp"),
        "rb" => ("Ruby", "ruby"),
        "php" => ("PHP", "php"),
        "swift" => ("Swift", "swift"),
        "sh" | "bash" => ("shell script", "bash"),
        "sql" => ("SQL", "sql"),
        "html" | "htm" => ("HTML", "html"),
        "css" => ("CSS", "css"),
        "md" | "markdown" => ("Markdown", "markdown"),
        "yaml" | "yml" => ("YAML", "yaml"),
        "json" => ("JSON", "json"),
        "toml" => ("TOML", "toml"),
        "xml" => ("XML", "xml"),
        "proto" => ("Protocol Buffers", "protobuf"),
        "lua" => ("Lua", "lua"),
        "r" => ("R", "r"),
        "dart" => ("Dart", "dart"),
        "ex" | "exs" => ("Elixir", "elixir"),
        "hs" => ("Haskell", "haskell"),
        "tf" => ("Terraform", "hcl"),
        _ => ("text", "text"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn languages_come_from_names() {
        assert_eq!(super::of("src/app/main.py"), ("Python", "python"));
        assert_eq!(super::of("web/App.TSX"), ("TypeScript (TSX)", "tsx"));
        assert_eq!(super::of("build/Dockerfile"), ("Dockerfile", "dockerfile"));
        assert_eq!(super::of("LICENSE"), ("text", "text"));
    }
}
