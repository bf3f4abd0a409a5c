"""Generated sections of RESULTS.md: a runner replaces only its own section, the study's report keeps them."""

from hybrid_distill_jax.experiments import report


def test_write_section_appends_then_replaces_only_its_own(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nhand-written text\n")
    report.write_section(str(path), "a", ["## A", "first"])
    report.write_section(str(path), "b", ["## B"])
    report.write_section(str(path), "a", ["## A", "second"])
    text = path.read_text()
    assert text.startswith("# Results\n\nhand-written text\n\n<!-- BEGIN generated section: a -->\n")
    assert "second" in text and "first" not in text
    assert text.count("generated section: a") == 2 and text.index("## A") < text.index("## B")
    report.write_section(str(tmp_path / "new" / "R.md"), "a", ["x"])  # a new file holds only the section
    assert (tmp_path / "new" / "R.md").read_text() == (
        "<!-- BEGIN generated section: a -->\nx\n<!-- END generated section: a -->\n"
    )


def test_a_rewritten_report_keeps_every_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    assert report.keep_sections(str(path), "new report\n") == "new report\n"  # no file yet
    path.write_text("old report\n")
    report.write_section(str(path), "a", ["## A"])
    report.write_section(str(path), "b", ["## B"])
    text = report.keep_sections(str(path), "new report\n")
    assert text.startswith("new report\n\n<!-- BEGIN generated section: a -->") and "old report" not in text
    path.write_text(text)
    report.write_section(str(path), "b", ["## B again"])  # still a section of its own after the rewrite
    assert path.read_text().count("## B") == 1 and "## B again" in path.read_text()
