"""Streamlit views of saesteer: the only package under src/ that imports streamlit."""
