"""MkDocs hook: the figures `vrnn reproduce --report-only` writes into results/ are served
by the site as results/<name> (the tables come in through snippets), so that the pages
show what the committed records give, never a pasted copy."""

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent


def on_files(files, config):
    for png in sorted((ROOT / "results").glob("*.png")):
        files.append(File(f"results/{png.name}", str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
