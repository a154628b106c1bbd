"""Plotly reports (app layer). ``html.write_report`` writes one self-contained, offline HTML file."""
