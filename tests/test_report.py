from esr.report import audit_markdown_to_html, fidelity_notes


def test_audit_markdown_renders_lists_tables_and_emphasis(tmp_path):
    md = tmp_path / "a.md"
    md.write_text("# Title\n\n**Verdicts.** text `code`\n\n* *Printed.* a\n  continued\n* top\n  - nested\n\n"
                  "| id | verdict |\n|---|---|\n| 3 | **consistent** |\n")
    out = tmp_path / "a.html"
    audit_markdown_to_html(md, out, "t")
    html = out.read_text()
    assert "<h1>Title</h1>" in html and "<b>Verdicts.</b>" in html and "<code>code</code>" in html
    assert "<li><i>Printed.</i> a continued</li>" in html and html.count("<ul>") == 2
    assert "<th>verdict</th>" in html and "<td><b>consistent</b></td>" in html and "**" not in html


def test_fidelity_notes_state_the_approximations(repo_root):
    import yaml

    from esr.config import validate_config

    cfg = validate_config(yaml.safe_load((repo_root / "config/config.yaml").read_text()))
    notes = " ".join(fidelity_notes(cfg))
    assert "APPROXIMATION" in notes and "Planted positive control" in notes and "layer 15" in notes
